"""`--draft mlp` end to end as real processes: `serve-target --features last --to-dir` on the
tiny target, `train-draft --draft mlp` under torchrun (2 ranks, gloo), checkpoint layout,
`--init-from` warm start, and the EAGLE-3 trainer refusing `last` records in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.goldens.tiny_target import CONVERSATIONS, build_tiny_target

pytestmark = pytest.mark.integration
ENV = {"OMP_NUM_THREADS": "1", "SPECCTL_PACK": "torch"}


def _summary(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # stdout carries only the summary
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def recs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mlp")
    target = build_tiny_target(root / "target", num_layers=4)
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 4))
    out = {"target": target}
    for features in ("last", "all"):
        args = ["serve-target", "--model", str(target), "--data", str(chats), "--epochs", "2"]
        s = _summary(
            run_cli(*args, "--features", features, "--to-dir", str(root / features), env=ENV)
        )
        out[features] = root / features
        out[f"{features}_bytes"] = s["bytes"]  # type: ignore[assignment]
        assert s["features"] == features
    return out


def test_features_last_records_are_smaller(recs: dict) -> None:
    # H instead of (3 + 1) * H values a token (a quarter; header and alignment at H=64 add)
    assert recs["last_bytes"] < 0.4 * recs["all_bytes"]
    from specctl.pack import unpack_record

    rec = unpack_record(bytearray(next(recs["last"].glob("*.rec")).read_bytes()), verify=True)
    assert rec.aux_hidden is None and rec.last_hidden is not None


def test_mlp_trains_on_two_ranks_and_warm_starts(recs: dict, tmp_path: Path) -> None:
    common = ["train-draft", "--draft", "mlp", "--target", str(recs["target"])]
    common += ["--from-dir", str(recs["last"]), "--batch-size", "2", "--lr", "1e-2"]
    common += ["--set", "epochs=10", "--set", "heldout=0.15", "--set", "eval_every=10"]
    out1 = tmp_path / "phase1"
    s1 = _summary(run_cli(*common, "--out", str(out1), "--max-steps", "30", "--nproc", "2",
                          "--set", "save_every=10", env=ENV, timeout=300))  # fmt: skip
    assert s1["world"] == 2 and s1["steps"] == 30
    rows = [json.loads(x) for x in (out1 / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert {"loss_0", "loss_2", "acc_0", "acc_2", "sim_al"} <= set(train[-1])
    assert train[-1]["loss"] < train[0]["loss"]
    ckpt = (out1 / "latest").resolve()
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.json",
        "draft.safetensors",
        "optimizer.pt",
        "rng-rank0.pt",
        "rng-rank1.pt",
        "trainer_state.json",
        "vocab.safetensors",
    ]
    assert json.loads((ckpt / "config.json").read_text())["draft_family"] == "mlp"
    sd = load_file(str(ckpt / "draft.safetensors"))
    assert sorted(sd) == sorted(
        [f"{m}.{i}.weight" for m in ("emb", "proj", "head", "ln") for i in range(3)]
        + [f"ln.{i}.bias" for i in range(3)]
    )  # vLLM MLPSpeculator names
    # phase 2: weights only from phase 1's best; fresh step counter (1 rank)
    out2 = tmp_path / "phase2"
    s2 = _summary(run_cli(*common, "--out", str(out2), "--max-steps", "4",
                          "--init-from", str(out1), env=ENV, timeout=300))  # fmt: skip
    assert s2["steps"] == 4 and s2["samples"] == 8
    fresh = _summary(run_cli(*common, "--out", str(tmp_path / "fresh"), "--max-steps", "4",
                             env=ENV, timeout=300))  # fmt: skip
    assert s2["loss"] < fresh["loss"], (s2, fresh)  # the warm start starts ahead


def test_eagle3_refuses_last_records_in_one_line(recs: dict, tmp_path: Path) -> None:
    proc = run_cli("train-draft", "--target", str(recs["target"]), "--from-dir",
                   str(recs["last"]), "--out", str(tmp_path / "e"), env=ENV)  # fmt: skip
    assert proc.returncode == 1 and proc.stdout == ""
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "--features last" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
