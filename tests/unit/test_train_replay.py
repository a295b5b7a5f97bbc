"""ReplaySpool: gap, replay count, memory budget, copies."""

from __future__ import annotations

import pytest
import torch

from specctl.train.data import Batch
from specctl.train.replay import ReplaySpool, _nbytes

pytestmark = pytest.mark.unit


def batch(first: int, n: int = 2, T: int = 3, H: int = 4) -> Batch:
    return Batch(
        input_ids=torch.full((n, T), first),
        loss_mask=torch.ones(n, T, dtype=torch.uint8),
        aux=torch.zeros(n, T, 3 * H),
        last_hidden=torch.zeros(n, T, H),
        ids=[(0, first + i) for i in range(n)],
        lengths=[T] * n,
        handles=["store handle"] * n,
    )


def firsts(spool: ReplaySpool) -> list[int]:
    out = []
    while (b := spool.take()) is not None:
        out.append(int(b.input_ids[0, 0]))
    return out


def test_replays_the_oldest_gap_fresh_samples_after_its_last_pass() -> None:
    spool = ReplaySpool(times=2, gap=4, budget_bytes=1 << 20)
    spool.add(batch(0))
    spool.add(batch(2))
    assert not spool.ready() and spool.take() is None  # 2 fresh samples after 0 < 4
    spool.add(batch(4))
    b = spool.take()
    assert b is not None and int(b.input_ids[0, 0]) == 0
    assert (b.ids, b.handles, b.replayed) == ([], [], 2)  # not counted, nothing to ack
    assert firsts(spool) == []  # 2 had only 2 fresh samples after it; 0 was just replayed
    spool.add(batch(6))
    assert firsts(spool) == [2]
    spool.add(batch(8))
    spool.add(batch(10))
    assert firsts(spool) == [4, 0, 6, 2]  # 0 and 2: second (last) passes, 4+ fresh after
    seen = []
    for first in range(12, 40, 2):
        spool.add(batch(first))
        seen += firsts(spool)
    assert 0 not in seen and 2 not in seen
    assert all(seen.count(x) == 2 for x in range(8, 30, 2))  # each exactly twice, then gone


def test_copies_are_independent_and_the_budget_drops_the_oldest() -> None:
    one = batch(0)
    spool = ReplaySpool(times=1, gap=0, budget_bytes=2 * _nbytes(one))
    spool.add(one)
    one.input_ids.fill_(99)  # the trainer's tensors may change: the spool kept a copy
    assert firsts(spool) == [0]
    spool.add(batch(2))
    spool.add(batch(4))
    spool.add(batch(6))  # over budget: batch 2 is dropped
    assert firsts(spool) == [4, 6]


def test_off_spools_nothing() -> None:
    spool = ReplaySpool(times=0, gap=0, budget_bytes=1 << 20)
    spool.add(batch(0))
    assert spool.take() is None
