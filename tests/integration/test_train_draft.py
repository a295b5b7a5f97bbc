"""`specctl train-draft` as real processes: learning, 2 ranks == 1 rank, exact resume, bad input.

Records come from a real tiny Llama target (tests/unit/test_train_data.py). Every process
runs with OMP_NUM_THREADS=1: on a loaded 2-core box two OpenMP threads per process spin
against each other and slow tiny steps down ~20x.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli
from tests.unit.test_train_data import make_records, make_target

pytestmark = pytest.mark.integration
ENV = {"OMP_NUM_THREADS": "1", "SPECCTL_PACK": "torch"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    target = make_target(root / "target", position_wise=True)
    make_records(target, root / "recs", 100, T=16)
    return {"root": root, "target": target, "recs": root / "recs"}


def common(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "train-draft",
        "--target",
        str(data["target"]),
        "--from-dir",
        str(data["recs"]),
        "--out",
        str(out),
        "--draft-vocab-size",
        "64",
        *extra,
    ]


def train(args: list[str], env: dict[str, str] | None = None) -> dict:
    proc = run_cli(*args, env={**ENV, **(env or {})}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # stdout carries only the summary
    return json.loads(lines[0])


def metrics(out: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_learns_and_checkpoints(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    s = train(
        common(
            data,
            out,
            "--max-steps",
            "120",
            "--batch-size",
            "4",
            "--lr",
            "1e-2",
            "--set",
            "epochs=6",
            "--set",
            "eval_every=40",
            "--set",
            "save_every=40",
            "--set",
            "log_every=5",
            "--set",
            "optim.warmup_steps=10",
            "--set",
            "heldout=0.1",
        )
    )
    assert s["steps"] == 120 and s["samples"] == 480
    rows = metrics(out)
    first, last = rows[0], rows[-1]
    assert last["loss"] < 0.8 * first["loss"]
    assert last["acc_0"] > first["acc_0"] + 0.3 and last["acc_0"] > 0.6
    assert last["sim_al"] > first["sim_al"] + 1.0
    evals = metrics(out, "eval")
    assert [e["step"] for e in evals] == [40, 80, 120]
    assert s["best_al"] == max(e["sim_al"] for e in evals) > 2.0
    assert 0 <= s["data_wait_pct"] < 100 and s["tokens_per_s"] > 0
    # a test-sized head: head_matmul auto timed it and kept fp32 (nothing to win)
    assert s["head_matmul"]["dtype"] == "fp32" and "fp32_ms" in s["head_matmul"]
    # exact checkpoint files; latest and best links; the export names inside
    ckpt = (out / "latest").resolve()
    assert ckpt.name == "step-00000120" and (out / "best").resolve().is_dir()
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.json",
        "draft.safetensors",
        "optimizer.pt",
        "rng-rank0.pt",
        "trainer_state.json",
        "vocab.safetensors",
    ]
    sd = load_file(str(ckpt / "draft.safetensors"))
    assert {
        "fc.weight",
        "midlayer.self_attn.q_proj.weight",
        "lm_head.weight",
        "d2t",
        "t2d",
        "embed_tokens.weight",
        "norm.weight",
    } <= set(sd)
    assert sd["lm_head.weight"].shape == (64, 32)
    assert json.loads((ckpt / "config.json").read_text())["draft"]["draft_vocab_size"] == 64
    assert list((out / "tensorboard").iterdir())


def test_two_ranks_match_one_rank(data: dict[str, Path], tmp_path: Path) -> None:
    flags = [
        "--max-steps",
        "8",
        "--lr",
        "3e-3",
        "--set",
        "log_every=1",
        "--set",
        "heldout=0",
        "--set",
        "save_every=8",
    ]
    one = train(common(data, tmp_path / "one", *flags, "--batch-size", "4"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "specctl.cli",
        *common(data, tmp_path / "two", *flags, "--batch-size", "2"),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, **ENV}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (one["world"], two["world"], one["samples"], two["samples"]) == (1, 2, 32, 32)
    l1 = [r["loss"] for r in metrics(tmp_path / "one")]
    l2 = [r["loss"] for r in metrics(tmp_path / "two")]
    assert len(l1) == len(l2) == 8
    assert l1 == pytest.approx(l2, rel=1e-4)
    states = [
        json.loads((tmp_path / r / "latest" / "trainer_state.json").read_text())
        for r in ("one", "two")
    ]
    assert states[0]["trained"] == states[1]["trained"] and len(states[1]["trained"]) == 32
    w1 = load_file(str(tmp_path / "one" / "latest" / "draft.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "latest" / "draft.safetensors"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4)


def test_resume_after_kill_trains_each_sample_once(data: dict[str, Path], tmp_path: Path) -> None:
    flags = [
        "--max-steps",
        "40",
        "--batch-size",
        "2",
        "--lr",
        "3e-3",
        "--set",
        "heldout=0.1",
        "--set",
        "save_every=20",
        "--set",
        "eval_every=20",
    ]
    train(common(data, tmp_path / "straight", *flags))
    killed = run_cli(
        *common(data, tmp_path / "resumed", *flags),
        env={**ENV, "SPECCTL_TEST_KILL_AT_STEP": "25"},
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "resumed" / "latest").resolve().name == "step-00000020"
    s = train(common(data, tmp_path / "resumed", *flags, "--resume"))
    assert s["steps"] == 40
    states = [
        json.loads((tmp_path / r / "latest" / "trainer_state.json").read_text())
        for r in ("straight", "resumed")
    ]
    assert states[0]["trained"] == states[1]["trained"]
    assert len(states[1]["trained"]) == states[1]["samples"] == 80  # each exactly once
    w1 = load_file(str(tmp_path / "straight" / "latest" / "draft.safetensors"))
    w2 = load_file(str(tmp_path / "resumed" / "latest" / "draft.safetensors"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-6, rtol=1e-5)
    again = run_cli(*common(data, tmp_path / "fresh", "--resume"), env=ENV)
    assert again.returncode == 1 and "no checkpoint" in _one_error(again.stderr)


def _one_error(stderr: str) -> str:
    errors = [x for x in stderr.splitlines() if x.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def test_bad_inputs_are_one_line_errors(data: dict[str, Path], tmp_path: Path) -> None:
    wide = make_target(tmp_path / "wide", hidden_size=48)
    make_records(wide, tmp_path / "wide_recs", 2, T=8)
    make_records(data["target"], tmp_path / "two_aux", 2, T=8, num_aux=2)
    base = ["train-draft", "--target", str(data["target"]), "--max-steps", "1"]
    cases = {
        "H=48, 3 aux layers; the target config says H=32": [
            *base,
            "--from-dir",
            str(tmp_path / "wide_recs"),
            "--out",
            str(tmp_path / "o1"),
        ],
        "H=32, 2 aux layers; the target config says H=32, 3 aux layers": [
            *base,
            "--from-dir",
            str(tmp_path / "two_aux"),
            "--out",
            str(tmp_path / "o2"),
        ],
        "cannot write to --out": [
            *base,
            "--from-dir",
            str(data["recs"]),
            "--out",
            str(data["recs"] / "0_0.rec" / "x"),
        ],
    }
    for message, args in cases.items():
        proc = run_cli(*args, env=ENV)
        assert proc.returncode == 1, proc.stderr
        assert message in _one_error(proc.stderr)
        assert proc.stdout == ""


def test_nproc_relaunches_under_torchrun_and_plan_starts_nothing(
    data: dict[str, Path], tmp_path: Path
) -> None:
    temp = Path(tempfile.gettempdir())
    before = {*temp.glob("torchelastic_*"), *temp.glob("specctl-torchrun-*")}
    s = train(
        common(
            data,
            tmp_path / "np",
            "--nproc",
            "2",
            "--max-steps",
            "2",
            "--batch-size",
            "1",
            "--set",
            "heldout=0",
        )
    )
    assert (s["world"], s["steps"], s["samples"]) == (2, 2, 4)
    after = {*temp.glob("torchelastic_*"), *temp.glob("specctl-torchrun-*")}
    assert after <= before  # torchrun's log dir went with it
    plan = run_cli(*common(data, tmp_path / "plan", "--plan", "--set", "optim.lr=3e-4"), env=ENV)
    assert plan.returncode == 0, plan.stderr
    resolved = json.loads(plan.stdout)["plan"]
    assert (resolved["ttt_length"], resolved["optim"]["lr"]) == (7, 3e-4)
    assert not (tmp_path / "plan").exists()


@pytest.mark.gpu
def test_trains_on_cuda_with_nccl_in_bf16(data: dict[str, Path], tmp_path: Path) -> None:
    s = train(
        common(
            data,
            tmp_path / "gpu",
            "--max-steps",
            "20",
            "--batch-size",
            "4",
            "--lr",
            "1e-2",
            "--precision",
            "bf16",
            "--set",
            "epochs=2",
        )
    )
    rows = metrics(tmp_path / "gpu")
    assert s["steps"] == 20 and rows[-1]["loss"] < rows[0]["loss"]
