"""Frozen CLI flags: every command's and subcommand's parameters (name, type, default).

Flags are an interface: a renamed flag or a changed default breaks scripts and recipes.
The snapshot is built by walking typer's click command tree (not by parsing --help text),
so help wording can change freely. After an intended change, regenerate and review the diff:

    SPECCTL_UPDATE_GOLDENS=1 .venv/bin/pytest tests/unit/test_cli_flags.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).resolve().parents[1] / "goldens" / "cli_flags.json"


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


def _param(p: Any) -> dict[str, Any]:
    return {
        "name": "/".join(p.opts + p.secondary_opts),
        "kind": p.param_type_name,  # option | argument
        "type": p.bare_type(),
        "default": _jsonable(p.default),
        "required": p.required,
        "multiple": p.multiple,
        "envvar": p.envvar,
    }


def _walk(cmd: Any, path: str, out: dict[str, list[dict[str, Any]]]) -> None:
    out[path] = [_param(p) for p in cmd.params]
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        _walk(sub, f"{path} {name}", out)


def snapshot() -> dict[str, list[dict[str, Any]]]:
    import typer.main

    from specctl.cli import app

    out: dict[str, list[dict[str, Any]]] = {}
    _walk(typer.main.get_command(app), "specctl", out)
    return out


def test_flags_match_the_snapshot() -> None:
    now = snapshot()
    if os.environ.get("SPECCTL_UPDATE_GOLDENS") == "1":
        GOLDEN.write_text(json.dumps(now, indent=1) + "\n")
    assert GOLDEN.exists(), "no golden yet: run with SPECCTL_UPDATE_GOLDENS=1"
    frozen = json.loads(GOLDEN.read_text())
    assert sorted(now) == sorted(frozen), "commands were added or removed (regenerate the golden)"
    for path in frozen:
        assert now[path] == frozen[path], (
            f"`{path}` flags changed; if intended, regenerate with SPECCTL_UPDATE_GOLDENS=1 "
            "and review the diff"
        )


def test_snapshot_sees_every_command() -> None:
    from specctl.cli import COMMANDS

    snap = snapshot()
    for name in COMMANDS:
        assert f"specctl {name}" in snap
    assert {"specctl store up", "specctl store status", "specctl store down"} <= set(snap)
    assert any(p["name"] == "--store" for p in snap["specctl serve-target"])


def _leaves() -> list[Any]:
    import typer.main

    from specctl.cli import app

    def walk(cmd: Any, path: str) -> list[tuple[str, Any]]:
        subs = getattr(cmd, "commands", None)
        if not subs:
            return [(path, cmd)]
        return [leaf for n, s in sorted(subs.items()) for leaf in walk(s, f"{path} {n}")]

    return [
        pytest.param(cmd, id=path) for path, cmd in walk(typer.main.get_command(app), "specctl")
    ]


@pytest.mark.parametrize("cmd", _leaves())
def test_every_command_help_has_an_example(cmd: Any) -> None:
    """STYLE: examples in every --help (the docstring is the help)."""
    assert "Example" in (cmd.help or ""), f"{cmd.name}: add an `Examples:` block to its docstring"
