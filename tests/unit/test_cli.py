"""The CLI shell: command table, instant --help (no torch at load), one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.unit

COMMANDS = ["store", "serve-target", "train-draft", "eval-accept", "export"]


def test_help_lists_the_five_commands() -> None:
    proc = run_cli("--help", check=True)
    for name in COMMANDS:
        assert name in proc.stdout


def test_cli_import_loads_no_heavy_modules() -> None:
    code = (
        "import sys, specctl.cli\n"
        "heavy = [m for m in ('torch', 'transformers', 'mooncake', 'datasets', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_command_is_a_usage_error() -> None:
    proc = run_cli("no-such-command")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(name: str) -> None:
    proc = run_cli(name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout
