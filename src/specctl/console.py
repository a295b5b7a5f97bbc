"""Streams split: stdout carries only the final JSON summary line; logs and progress go to stderr.

Progress is a rich live display on a TTY and plain periodic lines otherwise (CI, pipes),
so logs stay greppable.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from rich.console import Console

err = Console(stderr=True, highlight=False, soft_wrap=True)


def debug_enabled() -> bool:
    return os.environ.get("SPECCTL_DEBUG", "") not in ("", "0")


def log(message: str) -> None:
    """One log line on stderr."""
    err.print(message, markup=False)


def emit_summary(summary: Mapping[str, Any]) -> None:
    """The command's result: exactly one JSON line on stdout."""
    sys.stdout.write(json.dumps(summary, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


class Progress:
    """A counter with named rates. `update(n, **fields)` advances; shown live or every `every_s` seconds."""

    def __init__(self, label: str, total: int | None = None, every_s: float = 5.0) -> None:
        self.label = label
        self.total = total
        self.every_s = every_s
        self.done = 0
        self.fields: dict[str, Any] = {}
        self._t0 = time.monotonic()
        self._last = 0.0
        self._live: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if err.is_terminal:
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._live = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}" if self.total else "{task.completed}"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
                console=err,
                transient=False,
            )
            self._live.__enter__()
            self._task = self._live.add_task(self.label, total=self.total, info="")
        return self

    def update(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        self.fields.update(fields)
        info = "  ".join(f"{k}={_fmt(v)}" for k, v in self.fields.items())
        if self._live is not None:
            self._live.update(self._task, completed=self.done, info=info)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            total = f"/{self.total}" if self.total else ""
            log(f"[{self.label}] {self.done}{total} {info} ({now - self._t0:.0f}s)")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """A named stage with its duration logged at the end."""
    t0 = time.monotonic()
    log(f"▶ {name}")
    try:
        yield
    finally:
        log(f"✓ {name} ({time.monotonic() - t0:.1f}s)")
