"""Output-path helpers: fail early on an unwritable path; write files whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path


def unwritable_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` when `path` cannot be created under it, else None."""
    parent = path.expanduser().absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return parent
    return None


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write `.{name}.tmp{pid}` beside `path`, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
