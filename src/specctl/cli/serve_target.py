"""`specctl serve-target`: not built yet (see the issue tracker)."""

from __future__ import annotations

import typer

from specctl.errors import NotBuiltError


def command(ctx: typer.Context) -> None:
    """Not built yet."""
    raise NotBuiltError("'specctl serve-target' is not built yet")
