"""Replay: while the store has no fresh record ready, train again on samples already trained.

Why: on a CPU the producers are the bottleneck (bench-quality's trainer waited 35% of its
run for data, its held-out AL still rising at the end). Replaying recent micro-batches turns
that wait into later passes over the same samples, as multi-epoch trainers do, without
holding up fresh data: a fresh record always goes first. A replayed micro-batch lists no
sample ids, so it is neither counted as a trained sample again nor entered in the
exactly-once bookkeeping (`TrainerState.trained`); `TrainerState.replayed` counts it.

Each rank spools its own micro-batches (copies: the originals' tensors are the trainer's)
and replays the oldest first once `gap` fresh samples came after its last pass, each up to
`times` times, so passes over a sample are spread out; beyond `budget_bytes` the oldest are
dropped. Replays fill waits only: once the producers stop, no replay becomes ready. The
spool lives in memory: a resumed run starts with an empty one.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from specctl.train.data import Batch


def _nbytes(b: Batch) -> int:
    return sum(
        t.numel() * t.element_size() for t in (b.input_ids, b.loss_mask, b.aux, b.last_hidden)
    )


class ReplaySpool:
    def __init__(self, times: int, gap: int, budget_bytes: int) -> None:
        self.times, self.gap, self.budget = times, gap, budget_bytes
        # (copy, times replayed, fresh samples spooled when it was last trained), oldest first
        self._q: deque[tuple[Batch, int, int]] = deque()
        self._fresh = 0  # fresh samples spooled so far
        self._bytes = 0

    def add(self, b: Batch) -> None:
        """Spool a fresh micro-batch (copied, without ids or store handles)."""
        if self.times < 1 or not b.ids:
            return
        copy = dataclasses.replace(
            b,
            input_ids=b.input_ids.clone(),
            loss_mask=b.loss_mask.clone(),
            aux=b.aux.clone(),
            last_hidden=b.last_hidden.clone(),
            ids=[],
            lengths=list(b.lengths),
            handles=[],
            replayed=len(b.ids),
        )
        self._fresh += len(b.ids)
        self._push(copy, 0)
        while self._bytes > self.budget and len(self._q) > 1:
            self._pop()

    def ready(self) -> bool:
        """Whether `take` has a micro-batch: `gap` fresh samples came after its last pass."""
        return bool(self._q) and self._fresh - self._q[0][2] >= self.gap

    def take(self) -> Batch | None:
        """The oldest ready micro-batch (back in the queue if it has replays left), or None."""
        if not self.ready():
            return None
        b, n = self._pop()
        if n + 1 < self.times:
            self._push(b, n + 1)
        return b

    def _push(self, b: Batch, n: int) -> None:
        self._q.append((b, n, self._fresh))
        self._bytes += _nbytes(b)

    def _pop(self) -> tuple[Batch, int]:
        b, n, _ = self._q.popleft()
        self._bytes -= _nbytes(b)
        return b, n
