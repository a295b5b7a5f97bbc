"""`serve-target --engine vllm` (vLLM's CPU build) against the hf engine on SmolLM2-135M.

Opt-in: marker `engines`, run by `make test-engines` in `.venv-vllm`. Records must be
indistinguishable: ids and masks exactly, states within fp32 tolerance (the two engines sum
the residual stream in different orders: relative error ~1e-4 of the layer's scale).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from specctl.pack import unpack_record
from tests.conftest import REPO, SPECCTL, run_cli
from tests.goldens.tiny_target import CONVERSATIONS, build_tiny_target

pytestmark = pytest.mark.engines
REL_TOL = 5e-4  # max|vllm - hf| / max|hf| per tensor


@pytest.fixture(scope="module")
def smol() -> Path:
    from specctl.target.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    rows = [{"messages": c} for c in CONVERSATIONS[:2]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _summary(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_regenerated_records_match_the_hf_engine(smol: Path, chats: Path, tmp_path: Path) -> None:
    from specctl.target import data
    from specctl.target.engines.hf import HFEngine
    from specctl.target.producer import ServeTargetConfig
    from specctl.target.samples import build_samples

    args = ["--data", str(chats), "--regenerate", "--max-new-tokens", "24", "--dtype", "fp32"]
    out = tmp_path / "recs"
    s = _summary(
        run_cli(
            "serve-target",
            "--engine",
            "vllm",
            "--model",
            str(smol),
            "--to-dir",
            str(out),
            *args,
            timeout=400,
        )
    )
    assert s["records"] == 2 and s["engine"] == "vllm" and s["aux_layers"] == [1, 14, 26]
    # the hf engine builds the same samples (greedy regeneration) and captures them
    hf = HFEngine(smol, device="cpu")
    cfg = ServeTargetConfig(regenerate=True, max_new_tokens=24, temperature=0.0)
    prompts = data.load_prompts(str(chats), True)
    want = build_samples(hf, prompts, [(0, 0), (0, 1)], cfg)
    ref = hf.capture(want)
    for i in range(2):
        rec = unpack_record((out / f"0_{i}.rec").read_bytes(), verify=True)
        assert rec.input_ids.tolist() == want[i].input_ids  # incl. vLLM's regenerated answer
        assert rec.loss_mask.tolist() == want[i].loss_mask
        aux = rec.aux_hidden.split(hf.hidden_size, dim=-1)
        errs = [_rel(a, r) for a, r in zip(aux, ref[i].aux, strict=True)]
        errs.append(_rel(rec.last_hidden, ref[i].last))  # post-norm, like the hf engine
        assert max(errs) <= REL_TOL, errs


def test_streams_into_the_store(smol: Path, chats: Path, tmp_path: Path) -> None:
    from tests.integration.test_serve_target_store import consume, producer, running_store

    with running_store(tmp_path / "st", "--capacity", "256MiB") as store:
        p = producer(
            store, "--engine", "vllm", "--model", str(smol), "--data", str(chats), "--epochs", "2"
        )
        got = consume(store, 4, [p], timeout_s=400)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-3000:]
        s = json.loads(out.strip().splitlines()[-1])
    assert s["records"] == 4 and s["duplicates"] == 0 and s["engine"] == "vllm"
    assert sorted(g[0] for g in got) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {g[4] for g in got} <= {(n, 3 * 576) for n in range(1, 4096)}  # k=3 aux, H=576


def test_aux_layer_out_of_range_is_one_line(smol: Path, tmp_path: Path) -> None:
    proc = run_cli(
        "serve-target",
        "--engine",
        "vllm",
        "--model",
        str(smol),
        "--data",
        "chatterbot",
        "--aux-layers",
        "1,30",
        "--to-dir",
        str(tmp_path / "o"),
        timeout=200,
    )
    assert proc.returncode != 0 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert "Error: aux layer(s) [30] out of range" in proc.stderr, proc.stderr[-2000:]


def test_model_vllm_cannot_load_is_one_line(tmp_path: Path) -> None:
    model = build_tiny_target(tmp_path / "model", num_layers=2)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    proc = run_cli(
        "serve-target",
        "--engine",
        "vllm",
        "--model",
        str(model),
        "--data",
        "chatterbot",
        "--to-dir",
        str(tmp_path / "o"),
        timeout=200,
        env={"VLLM_LOGGING_LEVEL": "ERROR"},
    )
    assert proc.returncode != 0 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "vLLM cannot load" in errors[0], proc.stderr[-2000:]
    assert not any((tmp_path / "o").glob("*.rec"))


def test_kill_a_vllm_producer_every_prompt_exactly_once(smol: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    from collections import Counter

    from tests.integration.test_serve_target_store import consume, running_store

    n = 24
    args = ["--engine", "vllm", "--model", str(smol), "--data", "chatterbot"]
    args += ["--max-samples", str(n), "--set", "lease_size=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    with running_store(tmp_path / "st", "--capacity", "256MiB", "--lease-ttl", "2") as store:
        procs = [
            subprocess.Popen(
                [*SPECCTL, "serve-target", "--store", store, *args],
                cwd=REPO,
                text=True,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(2)
        ]
        victim, survivor = procs
        victim_id = None

        def kill_victim(desc) -> None:
            nonlocal victim_id
            if victim_id is None and desc.producer.endswith(f":{victim.pid}"):
                victim_id = desc.producer
                os.kill(victim.pid, signal.SIGKILL)

        try:
            got = consume(store, n, procs, on_record=kill_victim, timeout_s=500)
            _out, err = survivor.communicate(timeout=200)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.communicate()
    if victim.returncode != -signal.SIGKILL:
        pytest.skip("the survivor published every record before the victim's first one")
    assert survivor.returncode == 0, err[-3000:]
    counts = Counter(sid for sid, *_ in got)
    assert sorted(counts) == [(0, i) for i in range(n)]  # every prompt ...
    assert set(counts.values()) == {1}  # ... exactly once
    assert victim_id in {p for _, p, *_ in got}
