"""Regression golden: a short train-draft run on a fixed tiny setup keeps its held-out quality.

The target is the tiny position-wise Llama of tests/unit/test_train_data.py with a non-unit
final norm (like SmolLM2's, mean ~1.8), so the draft's initialisation from the target's head
and norm is exercised. Training records and the `--eval-from` records come from different
random prompts (seeds); the run is one process, one thread, fixed seeds. Its best held-out
simulated AL (`--eval-from`) must stay above the floor stored in
tests/goldens/train_quality.json.

Regenerate (after an intended change of the trainer, review the diff):
  SPECCTL_UPDATE_GOLDENS=1 .venv/bin/pytest -q tests/integration/test_train_quality.py
which stores the measured AL and a floor keeping 80% of its gain over AL 1 (a real regression,
e.g. a frozen or mis-initialised head, loses more; numerics across machines move it ~1%).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.unit.test_train_data import make_records, make_target

pytestmark = pytest.mark.integration
GOLDEN = Path(__file__).resolve().parents[1] / "goldens" / "train_quality.json"
KEEP_GAIN = 0.8
SETTINGS = [
    "--draft-vocab-size",
    "64",
    "--max-steps",
    "100",
    "--batch-size",
    "4",
    "--lr",
    "1e-2",
    "--ttt-length",
    "3",
    "--set",
    "epochs=5",
    "--set",
    "eval_every=20",
    "--set",
    "save_every=1000",
    "--set",
    "seed=0",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("quality")
    target = make_target(root / "target", position_wise=True)
    model = LlamaForCausalLM.from_pretrained(target)
    with torch.no_grad():  # a final norm far from ones, fixed
        g = torch.Generator().manual_seed(1)
        model.model.norm.weight.copy_(1.0 + 1.5 * torch.rand(model.config.hidden_size, generator=g))
    model.save_pretrained(target)
    make_records(target, root / "train", 96, T=16, seed=0)
    make_records(target, root / "eval", 32, T=16, seed=1, epoch=1)
    return {"root": root, "target": target}


def train(setup: dict[str, Path], out: Path, *extra: str) -> dict:
    proc = run_cli(
        "train-draft",
        "--target",
        str(setup["target"]),
        "--from-dir",
        str(setup["root"] / "train"),
        "--eval-from",
        str(setup["root"] / "eval"),
        "--out",
        str(out),
        *SETTINGS,
        *extra,
        env={"OMP_NUM_THREADS": "1", "SPECCTL_PACK": "torch"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_heldout_al_stays_above_the_golden_floor(setup: dict[str, Path], tmp_path: Path) -> None:
    s = train(setup, tmp_path / "run")
    al = s["best_al"]
    assert s["best_by"] == "eval_from" and s["best_step"] > 0
    if os.environ.get("SPECCTL_UPDATE_GOLDENS"):
        floor = round(1 + KEEP_GAIN * (al - 1), 3)
        GOLDEN.write_text(json.dumps({"measured_al": round(al, 4), "floor": floor}) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert al >= golden["floor"], (
        f"held-out simulated AL {al:.3f} fell below the golden floor {golden['floor']} "
        f"(measured {golden['measured_al']} when the golden was written)"
    )


def test_patience_stops_early_and_keeps_the_best(setup: dict[str, Path], tmp_path: Path) -> None:
    # A learning rate too small to flip any argmax: held-out AL (counts of top-1 hits) stays put,
    # so after the first eval (the best so far) every eval is "no gain".
    out = tmp_path / "run"
    s = train(setup, out, "--lr", "1e-12", "--patience", "2", "--set", "eval_every=2")
    assert s["stopped_early"] is True
    assert (s["best_step"], s["steps"]) == (2, 6)
    assert (out / "best").resolve().name == "step-00000002"
    assert 0 < s["eval_from_coverage"] <= 1 and s["draft_vocab_size"] == 64
    # coverage measured out of sample (the counted half not used for ranking), beside it
    assert 0 < s["vocab_coverage_split"] <= 1
