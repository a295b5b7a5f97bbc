"""`specctl eval-accept`: not built yet (see the issue tracker)."""

from __future__ import annotations

import typer

from specctl.errors import NotBuiltError


def command(ctx: typer.Context) -> None:
    """Not built yet."""
    raise NotBuiltError("'specctl eval-accept' is not built yet")
