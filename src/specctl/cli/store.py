"""`specctl store`: not built yet (see the issue tracker)."""

from __future__ import annotations

import typer

from specctl.errors import NotBuiltError


def command(ctx: typer.Context) -> None:
    """Not built yet."""
    raise NotBuiltError("'specctl store' is not built yet")
