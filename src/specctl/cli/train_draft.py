"""`specctl train-draft`: not built yet (see the issue tracker)."""

from __future__ import annotations

import typer

from specctl.errors import NotBuiltError


def command(ctx: typer.Context) -> None:
    """Not built yet."""
    raise NotBuiltError("'specctl train-draft' is not built yet")
