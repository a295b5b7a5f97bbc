"""Mooncake data plane: one object per record, written and read in place in the mapped
segment (same host) or moved between registered buffers by the transfer engine.

Who pins and who frees: the producer `put`s every record **hard-pinned** (Mooncake silently
evicts unpinned objects at 90% segment use, which would lose training data); the consumer
`remove(force=True)`s it after the optimizer step. Nobody else deletes objects, except
`requeue_untrained`, which clears a run's leftovers on trainer resume.

Mooncake traps handled here (facts: shared/reference/sglang-mooncake.md §2, §4):
- `setup()` blocks ~90 s when the master is down: callers probe the master port first
  (`address.require`) so an unreachable store fails in seconds.
- `put` on an existing key returns 0 and keeps the old value (and a session put answers
  -705). Keys are unique per put (`{run}/{epoch}/{index}/{put}`), so no put ever meets
  another's object.
- Every read grants a lease, so a plain `remove` after a `get` returns -706: we always
  remove with `force=True`. A lease shorter than a transfer fails the read with -707
  (seen with a 1 s TTL on an overloaded 2-core host), so the master keeps a 10 s TTL and
  reads retry -707.
- `get()` returns `b''` both for "missing" and "master down": we only use `get_into`,
  which returns negative codes, and map every code to a StoreError message.
- `batch_get_into` with a key twice reports the size for both but fills only the last
  buffer (the other keeps its old bytes): `get_many` never batches a key twice.
- -200 (no free space) is back-pressure, not failure: `put` waits and retries.
- No client contributes a segment: every object lives in the `--capacity` segment of the
  store's segment child (segment.py), so it survives producer and trainer death.
- Same-host fast path: the segment is a memfd that a client on the store's host maps
  (`mapped`). A put reserves its object (`batch_put_session_start` + `_end`: allocated,
  complete, never transferred) and reads the object's address from its replica descriptor;
  the caller then writes the record there (`reserve`). A get reads the descriptors of
  several objects in one call and returns views of them in place (`views`). Mooncake only
  allocates, tracks and frees: the bytes never pass through a transfer. A replica
  descriptor appears only once the session ended, so the session ends before the write
  (our control plane, not Mooncake's readiness, says when a record may be read). A
  producer reserves a batch's objects with the same three calls (`reserve_many`).
  `SPECCTL_STORE_SHM=0` forces the transfer path (TCP, as a client on another host).
- A client without a segment logs a harmless "Local segment descriptor not found" at
  `setup`: fd 2 is silenced around it unless SPECCTL_DEBUG is set.
- The transfer engine's own listeners bind the wildcard address whatever we pass
  (a Mooncake limitation); the master and the control plane bind only `--host`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from specctl.console import debug_enabled
from specctl.errors import StoreError
from specctl.store.segment import Mapping, Where

# mooncake-store/include/types.h; messages say what it means for a specctl user.
ERRORS: dict[int, str] = {
    -1: "internal error in Mooncake",
    -10: "buffer overflow",
    -100: "segment not found (a store client holding data went away)",
    -101: "segment already exists",
    -102: "segment error",
    -200: "store full (no free space in the segment)",
    -300: "invalid version",
    -400: "invalid key",
    -500: "write failed",
    -600: "invalid parameters (empty value, or buffer too small for the object)",
    -700: "invalid write",
    -701: "invalid read",
    -702: "invalid replica",
    -703: "replica not ready",
    -704: "object not found",
    -705: "object already exists",
    -706: "object has a read lease",
    -707: "read lease expired during the read",
    -800: "transfer failed (the segment owner is gone: the store server died?)",
    -801: "checksum mismatch in transfer",
    -900: "RPC to the Mooncake master failed (master down?)",
}
FULL = -200
NOT_FOUND = -704
TRANSIENT = (-703, -707)


def describe(code: int) -> str:
    if code in ERRORS:
        return f"{ERRORS[code]} [{code}]"
    if -1100 < code <= -1000:
        return f"Mooncake HA/etcd error [{code}]"
    if -1200 < code <= -1100:
        return f"Mooncake file/SSD error [{code}]"
    return f"Mooncake error [{code}]"


def check(code: int, what: str) -> int:
    """Return code if >= 0, else raise StoreError naming the operation and the meaning."""
    if code < 0:
        raise StoreError(f"{what}: {describe(code)}")
    return code


class Objects:
    """A Mooncake client: `setup`, registered buffers, put_from / get_into / remove(force);
    `reserve` / `views` on the mapped segment when the store runs on this host."""

    def __init__(
        self,
        master: str,
        *,
        host: str = "127.0.0.1",
        segment_bytes: int = 0,
        mapped: Where | None = None,
    ) -> None:
        if not debug_enabled():  # ~15 INFO lines per setup; GLOG_minloglevel is ignored
            os.environ.setdefault("MC_LOG_LEVEL", "WARNING")
        from mooncake.store import MooncakeDistributedStore, ReplicateConfig

        self.mapping = Mapping(mapped) if mapped is not None else None  # OSError: not here
        self._store: Any = MooncakeDistributedStore()
        # local_buffer_size=0: we only use the zero-copy *_from/*_into paths.
        # RDMA (CUDA Mooncake build, recipes/multi-host.md): SPECCTL_STORE_PROTOCOL=rdma
        # and SPECCTL_STORE_DEVICE=<NIC names, e.g. mlx5_0>; tcp otherwise.
        protocol = os.environ.get("SPECCTL_STORE_PROTOCOL", "tcp")
        device = os.environ.get("SPECCTL_STORE_DEVICE", "")
        with quiet_stderr():
            rc = self._store.setup(host, "P2PHANDSHAKE", segment_bytes, 0, protocol, device, master)
        if rc != 0:
            raise StoreError(f"Mooncake setup against master {master} failed [{rc}]")
        self._pin = ReplicateConfig()
        self._pin.replica_num = 1
        self._pin.with_hard_pin = True
        self._registered: set[int] = set()

    @property
    def mapped(self) -> bool:
        """Whether records move through the mapped segment (same host) or by transfer."""
        return self.mapping is not None

    def allocate(self, nbytes: int) -> Any:
        """A registered uint8 tensor of nbytes (a transfer buffer)."""
        import torch

        t = torch.empty(nbytes, dtype=torch.uint8)
        self.register(int(t.data_ptr()), nbytes)
        return t

    def register(self, ptr: int, nbytes: int) -> None:
        check(self._store.register_buffer(ptr, nbytes), "register buffer")
        self._registered.add(ptr)

    def unregister(self, ptr: int) -> None:
        if ptr in self._registered:
            self._store.unregister_buffer(ptr)
            self._registered.discard(ptr)

    def put(self, key: str, ptr: int, nbytes: int, *, wait_s: float = 600.0) -> int:
        """Hard-pinned put from a registered buffer; retries on -200 (full). Returns retries."""
        return self._while_full(
            key, nbytes, wait_s, lambda: int(self._store.put_from(key, ptr, nbytes, self._pin))
        )

    def reserve(self, key: str, nbytes: int, *, wait_s: float = 600.0) -> tuple[Any, int]:
        """Mapped segment: a hard-pinned object of nbytes for `key`, as a view to write the
        record into, and the -200 (full) retries it took. Keys are unique per put."""
        got: list[Any | None] = [None]

        def attempt() -> int:
            got[0] = self.reserve_many([key], [nbytes])[0]
            return FULL if got[0] is None else 0

        retries = self._while_full(key, nbytes, wait_s, attempt)
        return got[0], retries

    def reserve_many(self, keys: list[str], sizes: list[int]) -> list[Any | None]:
        """Mapped segment: `reserve` of several objects in three master round trips in all,
        without waiting: None for each the store had no room for (the caller puts those
        one by one, once the others are published and can drain)."""
        assert self.mapping is not None
        codes = [int(rc) for rc in self._store.batch_put_session_start(keys, sizes, self._pin)]
        started = [i for i, rc in enumerate(codes) if rc == 0]
        ended = self._store.batch_put_session_end([keys[i] for i in started]) if started else []
        bad = [(keys[i], int(rc)) for i, rc in zip(started, ended, strict=True) if rc != 0]
        bad += [(key, rc) for key, rc in zip(keys, codes, strict=True) if rc not in (0, FULL)]
        views = self.views([keys[i] for i in started], [sizes[i] for i in started])
        bad += [(keys[i], v) for i, v in zip(started, views, strict=True) if isinstance(v, int)]
        if bad:
            self.remove_many([keys[i] for i in started])
            key, rc = bad[0]
            raise StoreError(f"put {key!r}: {describe(rc)}")
        out: list[Any | None] = [None] * len(keys)
        for i, view in zip(started, views, strict=True):
            out[i] = view
        return out

    def _while_full(self, key: str, nbytes: int, wait_s: float, attempt: Callable[[], int]) -> int:
        """`attempt()` again while it answers -200 (full: back-pressure, not failure), up to
        wait_s; raises on any other error. Returns the retries."""
        deadline = time.monotonic() + wait_s
        retries, delay = 0, 0.01
        while (rc := attempt()) == FULL:
            if time.monotonic() > deadline:
                raise StoreError(
                    f"put {key!r}: store stayed full for {wait_s:.0f}s",
                    hint="is a consumer running and acking? or raise --capacity",
                )
            retries += 1
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        check(rc, f"put {key!r} ({nbytes} bytes)")
        return retries

    def views(self, keys: list[str], sizes: list[int]) -> list[Any]:
        """Mapped segment: for each key a view of its object in place (the record's bytes,
        no copy), or NOT_FOUND. One master round trip for all keys."""
        assert self.mapping is not None
        if not keys:
            return []
        found = self._store.batch_get_replica_desc(keys)  # logs "Object not found" if missing
        out: list[Any] = []
        for key, size in zip(keys, sizes, strict=True):
            replicas = [r for r in found.get(key, []) if r.is_memory_replica()]
            if not replicas:
                out.append(NOT_FOUND)
                continue
            buf = replicas[0].get_memory_descriptor().buffer_descriptor
            out.append(self.mapping.view(int(buf.buffer_address), min(size, int(buf.size))))
        return out

    def get_into(self, key: str, ptr: int, nbytes: int, tries: int = 5) -> int:
        """Bytes read into a registered buffer; negative Mooncake code on failure.

        -707 (the read lease expired mid-transfer, seen on an overloaded host) and -703
        (replica not ready yet) are transient: retried.
        """
        for attempt in range(tries):
            n = int(self._store.get_into(key, ptr, nbytes))
            if n not in TRANSIENT or attempt == tries - 1:
                return n
            time.sleep(0.05 * (attempt + 1))
        return n

    def get_many(self, keys: list[str], ptrs: list[int], sizes: list[int]) -> list[int]:
        """`get_into` of several objects in one round trip (~0.2 ms saved per object
        here). A key repeated in a batch reports its size for every copy but fills only the
        last buffer, so repeats (a record's twin descriptor) are got one by one, as are
        transient failures."""
        batch, seen = [], set()
        for i, key in enumerate(keys):
            if key not in seen:
                seen.add(key)
                batch.append(i)
        codes: dict[int, int] = {}
        if len(batch) > 1:
            got = self._store.batch_get_into(
                [keys[i] for i in batch], [ptrs[i] for i in batch], [sizes[i] for i in batch]
            )
            codes = dict(zip(batch, map(int, got), strict=True))
        out = []
        for i, (key, ptr, size) in enumerate(zip(keys, ptrs, sizes, strict=True)):
            n = codes.get(i)
            if n is None or n in TRANSIENT:  # a repeat, a lone key, or a transient failure
                n = self.get_into(key, ptr, size)
            out.append(n)
        return out

    def remove(self, key: str) -> int:
        """Force-remove (ignores read leases); 0 or -704 (already gone) are both fine."""
        rc = self.try_remove(key)
        if rc not in (0, NOT_FOUND):
            check(rc, f"remove {key!r}")
        return rc

    def remove_many(self, keys: list[str]) -> None:
        """Force-remove several objects in one master round trip; gone already is fine."""
        for key, rc in zip(keys, self._store.batch_remove(keys, True), strict=True):
            if rc not in (0, NOT_FOUND):
                check(int(rc), f"remove {key!r}")

    def try_remove(self, key: str) -> int:
        """Force-remove and return Mooncake's code (-703: a half-written put, try later)."""
        return int(self._store.remove(key, force=True))

    def remove_prefix(self, prefix: str) -> int:
        import re

        return max(0, int(self._store.remove_by_regex("^" + re.escape(prefix), force=True)))

    def close(self) -> None:
        for ptr in list(self._registered):
            self.unregister(ptr)
        if self.mapping is not None:
            self.mapping.close()
        self._store.close()


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence fd 2 (glog writes there directly, below Python) for the duration, unless
    SPECCTL_DEBUG is set."""
    if debug_enabled():
        yield
        return
    with _FD2:  # one thread at a time: nested saves would restore each other's devnull
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)


_FD2 = threading.Lock()
