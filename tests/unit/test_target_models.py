"""Model resolution: local paths, the built-in alias, its one-time cached conversion."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from specctl.errors import InputError
from specctl.target.models import cache_dir, resolve_model

pytestmark = pytest.mark.unit


def test_unknown_model_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown model"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"config\.json"):
        resolve_model(str(tmp_path / "empty"))


def test_cache_dir_follows_xdg(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "specctl" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "specctl" / "models"


def test_alias_resolves_to_a_converted_folder() -> None:
    path = resolve_model("smollm2-135m")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in path.iterdir()
    }


@pytest.mark.slow
def test_concurrent_first_conversion_happens_once(tmp_path: Path) -> None:
    """Two processes resolve the alias into an empty cache at once: one converts, both agree."""
    code = "from specctl.target.models import resolve_model; print(resolve_model('smollm2-135m'))"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]
    assert sum(err.count("converting") for _, err in outs) == 1
    folder = Path(outs[0][0].strip())
    assert (folder / "config.json").is_file()
    assert [p.name for p in folder.parent.iterdir() if ".tmp" in p.name] == []
