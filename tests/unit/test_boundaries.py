"""Import boundaries from STYLE.md: plain models, one place for parallelism, stdlib-only protocol."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SRC = Path(__file__).resolve().parents[2] / "src" / "specctl"


def _py_files(sub: str) -> list[Path]:
    files = sorted((SRC / sub).rglob("*.py"))
    assert files, f"src/specctl/{sub} has no modules"
    return files


def test_draft_models_never_touch_torch_distributed() -> None:
    for path in _py_files("draft"):
        text = path.read_text()
        assert "torch.distributed" not in text, f"{path} imports torch.distributed"
        assert "fully_shard" not in text, path


def test_fully_shard_lives_only_in_train_parallel() -> None:
    users = [p for p in SRC.rglob("*.py") if re.search(r"\bfully_shard\s*\(", p.read_text())]
    assert users == [SRC / "train" / "parallel.py"], users


def test_protocol_is_stdlib_only() -> None:
    code = (
        "import sys, specctl.protocol\n"
        "bad = [m for m in ('torch', 'numpy', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
