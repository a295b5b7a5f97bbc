"""Options shared by several commands, defined once as `Annotated` aliases."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar="SPECCTL_STORE",
        show_envvar=True,
        help="Store address HOST:PORT (printed by `specctl store up`).",
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file; flags and --set override it."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Dotted config override, e.g. --set train.lr=3e-4 (repeatable)."),
]
PlanOpt = Annotated[
    bool,
    typer.Option("--plan", help="Print the resolved config and what would run; start nothing."),
]
