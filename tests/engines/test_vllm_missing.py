"""`--engine vllm` without vLLM installed: one line naming `make setup-vllm` (main venv)."""

from __future__ import annotations

import sys

import pytest

from specctl.errors import InputError
from tests.conftest import run_cli
from tests.goldens.tiny_target import build_tiny_target


@pytest.mark.unit
def test_import_vllm_names_make_setup_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    from specctl.target.engines.vllm import import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(InputError) as e:
        import_vllm()
    assert "make setup-vllm" in str(e.value)


@pytest.mark.integration
def test_cli_without_vllm_prints_one_line(tmp_path) -> None:
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed in this venv")
    except ImportError:
        pass
    model = build_tiny_target(tmp_path / "model", num_layers=4)
    proc = run_cli(
        "serve-target",
        "--engine",
        "vllm",
        "--model",
        str(model),
        "--data",
        "chatterbot",
        "--to-dir",
        str(tmp_path / "out"),
    )
    assert proc.returncode != 0 and proc.stdout == ""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert len(errors) == 1 and "vLLM" in errors[0], proc.stderr
    assert "make setup-vllm" in proc.stderr and "Traceback" not in proc.stderr
