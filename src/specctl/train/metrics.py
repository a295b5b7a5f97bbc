"""Training logs: one JSON object per line (`OUT/metrics.jsonl`) and TensorBoard scalars.

Only rank 0 writes. TensorBoard is optional at run time: without the package only the
JSONL is written (said once on stderr).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from specctl.console import log


class MetricsLog:
    def __init__(self, out: Path, enabled: bool) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._tb: Any = None
        if not enabled:
            return
        self._jsonl = open(out / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            log("tensorboard is not installed: metrics go to metrics.jsonl only")

    def write(self, kind: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled or self._jsonl is None:
            return
        self._jsonl.write(
            json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n"
        )
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
