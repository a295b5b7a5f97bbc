"""Checkpoint directories: atomic rename, latest/best links, pruning, state round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specctl.errors import CheckpointError
from specctl.train.checkpoint import (
    TrainerState,
    read_checkpoint,
    restore_rng,
    write_checkpoint,
    write_rng,
)

pytestmark = pytest.mark.unit


def _save(out: Path, step: int, best: bool) -> Path:
    (out / "config.json").write_text("{}")
    (out / "vocab.safetensors").write_bytes(b"v")
    state = TrainerState(
        step=step, trained={(0, step), (1, 2)}, heldout_seen={(0, 9)}, samples=2, tokens=10
    )
    write_rng(out, step, 0)
    return write_checkpoint(
        out,
        state,
        {"fc.weight": torch.ones(2, 2) * step},
        {"optimizer": {}, "scheduler": {}},
        out / "config.json",
        out / "vocab.safetensors",
        best,
    )


def test_links_prune_and_round_trip(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        read_checkpoint(tmp_path)
    _save(tmp_path, 10, best=True)
    _save(tmp_path, 20, best=False)
    torch.manual_seed(123)
    _save(tmp_path, 30, best=False)
    expected = torch.rand(3)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-00000010", "step-00000030"]  # best and latest only, no temp dirs
    assert (tmp_path / "best").resolve().name == "step-00000010"
    ckpt, state = read_checkpoint(tmp_path)
    assert ckpt.name == "step-00000030" and state.step == 30
    assert state.trained == {(0, 30), (1, 2)} and state.heldout_seen == {(0, 9)}
    assert json.loads((ckpt / "trainer_state.json").read_text())["trained"] == [[0, 30], [1, 2]]
    restore_rng(ckpt, 0)  # the RNG as it was when step 30 was saved
    assert torch.equal(torch.rand(3), expected)
    (ckpt / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: missing optimizer\.pt"):
        read_checkpoint(tmp_path)
