"""Receive/send slot pool: reuse by size, bounded free list, registration bookkeeping."""

from __future__ import annotations

import pytest
import torch

from specctl.store.slots import GRANULE, KEEP_FREE, Slots

pytestmark = pytest.mark.unit


class Registry:
    """Stands in for Mooncake's register_buffer/unregister_buffer (the only calls Slots makes)."""

    def __init__(self) -> None:
        self.live: dict[int, int] = {}

    def allocate(self, nbytes: int) -> torch.Tensor:
        t = torch.empty(nbytes, dtype=torch.uint8)
        self.register(int(t.data_ptr()), nbytes)
        return t

    def register(self, ptr: int, nbytes: int) -> None:
        assert ptr not in self.live
        self.live[ptr] = nbytes

    def unregister(self, ptr: int) -> None:
        del self.live[ptr]


def test_slots_are_reused_smallest_fit_first_and_bounded() -> None:
    reg = Registry()
    slots = Slots(reg)  # type: ignore[arg-type]
    small, big = slots.take(10), slots.take(3 * GRANULE + 1)
    assert (small.nbytes, big.nbytes) == (GRANULE, 4 * GRANULE)
    slots.give(big)
    slots.give(small)
    assert slots.take(100) is small  # smallest that fits, not the first freed
    assert slots.take(2 * GRANULE) is big
    held = [slots.take(GRANULE) for _ in range(KEEP_FREE + 3)]
    for s in held:
        slots.give(s)
    assert len(slots.free) == KEEP_FREE
    assert len(reg.live) == KEEP_FREE + 2  # the extra free slots were unregistered
    slots.close()
    assert set(reg.live) == {small.ptr, big.ptr}  # still held by the caller
