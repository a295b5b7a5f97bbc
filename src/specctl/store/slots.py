"""Registered host buffers for Mooncake zero-copy I/O, pooled and reused.

Mooncake's `put_from`/`get_into` need memory registered with the client
(`register_buffer`, ~0.5 ms for 512 MiB on TCP). Registering per record would be wasteful,
so buffers live in a small pool: a consumer holds one slot per unacked record (the
record's tensors are views into it) and gives it back on ack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from specctl.store.objects import Objects

GRANULE = 1 << 20  # sizes round up to 1 MiB so slots fit records of nearby sizes
KEEP_FREE = 8  # free slots kept for reuse; more are unregistered and freed


@dataclass(eq=False)  # identity: two slots are never equal (and tensors do not compare)
class Slot:
    tensor: Any  # torch uint8 [nbytes], 64-byte aligned by torch's allocator

    @property
    def ptr(self) -> int:
        return int(self.tensor.data_ptr())

    @property
    def nbytes(self) -> int:
        return int(self.tensor.numel())

    def contains(self, ptr: int, nbytes: int) -> bool:
        return self.ptr <= ptr and ptr + nbytes <= self.ptr + self.nbytes


class Slots:
    def __init__(self, objects: Objects) -> None:
        self.objects = objects
        self.free: list[Slot] = []
        self.used = 0

    def new(self, nbytes: int) -> Slot:
        size = max(GRANULE, -(-nbytes // GRANULE) * GRANULE)
        slot = Slot(self.objects.allocate(size))
        self.used += 1
        return slot

    def take(self, nbytes: int) -> Slot:
        """The smallest free slot that fits, else a new one."""
        fits = [s for s in self.free if s.nbytes >= nbytes]
        if fits:
            slot = min(fits, key=lambda s: s.nbytes)
            self.free.remove(slot)
            self.used += 1
            return slot
        return self.new(nbytes)

    def give(self, slot: Slot) -> None:
        self.used -= 1
        self.free.append(slot)
        if len(self.free) > KEEP_FREE:
            self._unregister(min(self.free, key=lambda s: s.nbytes))

    def drop(self, slot: Slot) -> None:
        self.used -= 1
        self.objects.unregister(slot.ptr)

    def _unregister(self, slot: Slot) -> None:
        self.free.remove(slot)
        self.objects.unregister(slot.ptr)

    def close(self) -> None:
        for slot in list(self.free):
            self._unregister(slot)
