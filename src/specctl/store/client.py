"""`specctl.store.Client`: what producers and trainers call (docs/architecture.md).

Producer: `lease_prompts` -> pack into `buffer(nbytes, sample)` -> `put_record` ->
`lease.done`; or `put_record_async`, whose transfer and publication run on the client's put
thread while the next record is packed into the other of two buffers (one put in flight).
On the store's host, `prepare` begins a batch's puts at once (its objects reserved in one
set of Mooncake calls) before their `buffer` calls.
Trainer: `next_record` -> train on `got.record` (zero-copy views) -> `ack([got, ...])`;
queued records are fetched up to `read_ahead` at a time in one batched get.

A `Received.record` is views of the object in the mapped segment (same host) or of a
receive slot filled by Mooncake `get_into` (a registered buffer); it stays valid until it
is acked (or `release()`d), after which the object is freed or the slot reused.

In-flight bytes (put, not yet acked) are what the producers' ledgers (ledger.py) counted
minus what consumers drained: `put_record` waits while they are above the high
watermark until they drop to the low one, and Mooncake's -200 (full) is waited out too,
so a slow trainer slows producers and nothing is dropped.

Exactly once: a seq is leased to one producer at a time (leases.py); its publication is
claimed on the control plane before the put, so a re-issued seq is never published twice
(`put_record` returns None to the loser); a consumer sees a sample again only after it was
handed back (corrupt record, `requeue_untrained`), and drops repeats it already delivered.

On the store's own host, clients map the segment (segment.py): a producer packs each record
into its object (`buffer(nbytes, sample)`) and a trainer reads it there, so a record is
written once and read once. From other hosts records go over Mooncake's transfer engine (TCP
or RDMA) between registered buffers.

`connect` probes the control-plane port and the Mooncake master port with a plain socket
before building any client, so a dead store fails within `timeout_s` instead of Mooncake's
~90 s `setup()` hang; a store that dies later surfaces as StoreUnavailable. The mapping
from seq to sample id needs the run's prompt count: producers set
`run_meta("num_prompts", ...)` before leasing. A Client is not thread-safe (one per
thread); its heartbeat and put threads use their own control-plane connections.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from specctl.console import log
from specctl.errors import RecordError, StoreError, StoreUnavailable
from specctl.protocol import VERSION as PROTOCOL_VERSION
from specctl.protocol import Descriptor, RecordHeader, parse_header, record_key
from specctl.store import control as keys
from specctl.store.address import is_loopback, parse, require
from specctl.store.control import Control
from specctl.store.leases import Lease, LeaseBook
from specctl.store.ledger import Ledger
from specctl.store.objects import NOT_FOUND, TRANSIENT, Objects, describe
from specctl.store.segment import Where
from specctl.store.slots import Slot, Slots

ROLES = ("producer", "trainer", "admin")
READ_AHEAD = 4  # records a consumer fetches in one Mooncake call when that many are queued
PREPARE_BYTES = 64 << 20  # most a producer's `prepare` reserves ahead (larger records gain little)
_ids = itertools.count()


@dataclass
class _Put:
    """A claimed, counted put: what its copy and publication need."""

    desc: Descriptor
    text: str  # desc as JSON, as pushed and as kept in the ledger
    buf: Any  # the packed record (uint8 tensor) it is copied from
    slot: Slot | None  # the send buffer holding buf, if it is one of ours
    nbytes: int
    placed: bool = False  # buf is the record's object itself (packed in place): no copy
    waits: int = 0  # full-store retries its object's reservation took


@dataclass
class Received:
    """One record handed to a consumer: its descriptor and zero-copy `pack.Record` views."""

    descriptor: Descriptor
    record: Any
    slot: Slot | None = field(default=None, repr=False)


class Client:
    """A connection to a running store (see module docstring)."""

    def __init__(self, ctl: Control, objects: Objects, role: str, address: str) -> None:
        self.ctl, self.objects, self.role, self.address = ctl, objects, role, address
        self.run = ctl.get(keys.meta("run")) or ""
        self.high_wm = int(ctl.get(keys.meta("high_wm")) or 0)
        self.low_wm = int(ctl.get(keys.meta("low_wm")) or 0)
        self.capacity = int(ctl.get(keys.meta("capacity")) or 0)
        self.producer = f"{socket.gethostname()}:{os.getpid()}"
        self.id = f"{self.producer}:{next(_ids)}"
        self.leases = LeaseBook(ctl, self.id)
        self.slots = Slots(objects)
        self._sends: list[Slot | None] = [None, None]  # pack buffers (see `buffer`)
        self._busy: Slot | None = None  # the one a put in flight copies from
        self._placed: _Put | None = None  # claimed, counted, its object handed out to pack
        self._prepared: dict[tuple[int, int], _Put] = {}  # by `prepare`, not handed out yet
        self._room, self._unseen = 0, 0  # high_wm - in-flight bytes at the last reading; put since
        self._gets = 0  # records handed out, not yet counted
        self._inflight: Future[Descriptor | None] | None = None
        self._putter: ThreadPoolExecutor | None = None
        self._put_ctl: Control | None = None
        self.read_ahead = READ_AHEAD
        self._ahead: deque[Received] = deque()  # fetched and checked, not yet claimed
        self._num_prompts: int | None = None
        self._stop = threading.Event()
        self._beat = threading.Thread(
            target=self._heartbeat,
            name="specctl-heartbeat",
            args=(ctl.clone(), float(ctl.get(keys.meta("lease_ttl_s")) or 5.0)),
            daemon=True,
        )
        self._ledger = Ledger()
        ctl.register(role, self.id)
        self._beat.start()

    @classmethod
    def connect(
        cls, address: str | None = None, role: str = "producer", timeout_s: float = 10.0
    ) -> Client:
        """Connect to the store at `address` (None: $SPECCTL_STORE)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        addr = parse(address)
        require(addr.host, addr.port, timeout_s, "specctl store")
        ctl = Control.connect(addr.host, addr.port, timeout_s)
        deadline = time.monotonic() + timeout_s
        while ctl.get(keys.meta("ready")) is None:
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"store at {addr} is not ready after {timeout_s:.0f}s")
            time.sleep(0.05)
        master = ctl.get(keys.meta("master")) or ""
        mhost, _, mport = master.rpartition(":")
        require(mhost, int(mport), timeout_s, "Mooncake master")
        host = _local_host(addr.host)
        return cls(ctl, _objects(ctl, master, addr.host, host), role, str(addr))

    def _heartbeat(self, ctl: Control, ttl_s: float) -> None:
        while not self._stop.wait(ttl_s / 3):
            try:
                ctl.add(keys.hb(self.id), 1)
            except Exception:  # store gone: the main thread will see it on its next call
                return

    # ------------------------------------------------------------------ run facts

    def run_meta(self, key: str, value: str | None = None) -> str:
        """Run-wide fact: the first `value` set wins; later callers must pass the same one."""
        if value is None:
            stored = self.ctl.get(f"run/{key}")
            if stored is None:
                raise StoreError(f"run meta {key!r} is not set in this store")
            return stored
        stored = self.ctl.claim(f"run/{key}", str(value))
        if stored != str(value):
            raise StoreError(
                f"run meta {key!r} is {stored!r} in this store, not {value!r}",
                hint="one store serves one run: `specctl store down` and up again",
            )
        return stored

    def _prompts(self) -> int:
        if self._num_prompts is None:
            self._num_prompts = int(self.run_meta("num_prompts"))
        return self._num_prompts

    def _seq(self, epoch: int, index: int) -> int:
        return epoch * self._prompts() + index

    def _sid(self, seq: int) -> tuple[int, int]:
        epoch, index = divmod(seq, self._prompts())
        return epoch, index

    # ------------------------------------------------------------------ producer side

    def lease_prompts(self, n: int, limit: int | None = None) -> Lease | None:
        """Lease up to n seqs (returned ones first). None: nothing left below `limit`."""
        self._prompts()  # the supervisor needs it to map a dead producer's seqs to claims
        seqs = self.leases.take(n, limit)
        return Lease(self.leases, seqs) if seqs else None

    def buffer(self, nbytes: int, sample: tuple[int, int, int] | None = None) -> Any:
        """A uint8 tensor of nbytes to pack a record into, then to pass to `put_record(_async)`.

        With `sample` (epoch, index, T) and the store on this host, it is that sample's
        object in the mapped segment: the publication is claimed, the put counted and the
        object reserved here, so the record is packed where the trainer reads it and the
        put only publishes it. (When another producer published the sample, it is a send
        buffer, and the put returns None.) Otherwise it is one of two registered send
        buffers taking turns: while `put_record_async` copies from one, the next record is
        packed into the other.
        """
        self._abandon()
        if sample is not None and self.objects.mapped:
            self.flush()  # no Mooncake call beside a put in flight (the ledger's writes too)
            epoch, index, T = sample
            put = self._prepared.pop((epoch, index), None)
            if put is not None and (put.nbytes, put.desc.T) != (nbytes, T):
                self._abandon([put])  # prepared for another size: begin it anew
                put = None
            if put is None and (put := self._claim_sample(epoch, index, T, nbytes)) is not None:
                try:
                    put.buf, put.waits = self.objects.reserve(put.desc.key, nbytes)
                except BaseException:
                    self._take_back([put], self.ctl)
                    raise
                put.placed = True
            if put is not None:
                self._placed = put
                return put.buf
        i = 1 if self._busy is not None and self._busy is self._sends[0] else 0
        slot = self._sends[i]
        if slot is None or slot.nbytes < nbytes:
            self.flush()  # a new buffer is a Mooncake call: none beside a put in flight
            if slot is not None:
                self.slots.drop(slot)
            slot = self._sends[i] = self.slots.new(nbytes)
        return slot.tensor[:nbytes]

    def prepare(self, records: list[tuple[int, tuple[int, int, int]]]) -> int:
        """Begin the puts of a batch at once (store on this host): claim each sample, count
        them in one ledger write and reserve their objects in three Mooncake calls instead
        of three per record; `buffer(nbytes, sample)` then hands out each one's object.

        `records` are (nbytes, (epoch, index, T)), in the order they will be packed. A
        prefix of up to PREPARE_BYTES (and a quarter of the high watermark) is prepared, so
        a batch never holds much of the store empty; the rest, samples another producer
        has, and those the full store had no room for go the one-by-one way, as does the
        whole batch when in-flight bytes are above the high watermark (prepare never waits).
        Puts prepared earlier and not handed out are taken back first. Returns how many
        were prepared.
        """
        self.flush()
        self._abandon(self._prepared.values())
        if not self.objects.mapped:
            return 0
        budget = min(PREPARE_BYTES, self.high_wm // 4 or PREPARE_BYTES, self.capacity)
        picked, total = [], 0
        for nbytes, sample in records:
            total += nbytes
            if total > budget:
                break
            picked.append((nbytes, sample))
        if len(picked) < 2:  # one is as fast the one-by-one way
            return 0
        puts = [p for n, (e, i, t) in picked if (p := self._claim_pub(e, i, t, n)) is not None]
        if not puts:
            return 0
        if not self._count(puts, wait=False):
            self._take_back(puts, self.ctl)
            return 0
        try:
            views = self.objects.reserve_many([p.desc.key for p in puts], [p.nbytes for p in puts])
        except BaseException:
            self._take_back(puts, self.ctl)
            raise
        for put, view in zip(puts, views, strict=True):
            if view is not None:
                put.buf, put.placed = view, True
                self._prepared[(put.desc.epoch, put.desc.index)] = put
        self._take_back([p for p, v in zip(puts, views, strict=True) if v is None], self.ctl)
        return len(self._prepared)

    def is_prepared(self, epoch: int, index: int) -> bool:
        """Whether `prepare` began this sample's put (counted: no room to wait for)."""
        return (epoch, index) in self._prepared

    def _abandon(self, prepared: Iterable[_Put] = ()) -> None:
        """Take back the put whose object `buffer` handed out and that was never put, and
        the `prepared` ones given (their objects removed, their samples free again)."""
        drop = list(prepared)
        if self._placed is not None:
            drop.append(self._placed)
            self._placed = None
        if not drop:
            return
        for put in drop:
            self._prepared.pop((put.desc.epoch, put.desc.index), None)
        self.objects.remove_many([put.desc.key for put in drop])
        self._take_back(drop, self.ctl)

    def put_record(self, buf: Any, *, epoch: int, index: int, T: int) -> Descriptor | None:
        """Put one packed record (hard-pinned) and publish its descriptor.

        Returns None when this sample was already published by another producer (a lease
        re-issued from a producer presumed dead); the caller just marks the seq done.
        """
        self.flush()
        put = self._claim_put(buf, epoch, index, T)
        return None if put is None else self._copy_and_publish(put, self.ctl)

    def put_record_async(
        self, buf: Any, *, epoch: int, index: int, T: int
    ) -> Future[Descriptor | None]:
        """`put_record` whose copy and publication run on this client's put thread (a
        record packed in place into its object, `buffer(nbytes, sample)`, is only
        published, here).

        The claim and the in-flight count (back-pressure) happen here; the returned future
        holds the descriptor (None: published by another producer) or the put's error.
        One put is in flight at a time: this call first waits for the previous one. Mark
        the seq done only once its future is done, so a crash hands it back.
        """
        self.flush()
        put = self._claim_put(buf, epoch, index, T)
        if put is None or put.placed:  # lost, or packed in place: only publishing is left
            done: Future[Descriptor | None] = Future()
            try:
                done.set_result(None if put is None else self._copy_and_publish(put, self.ctl))
            except Exception as e:  # as from the put thread: the future holds the error
                done.set_exception(e)
            return done
        if self._putter is None:
            self._putter = ThreadPoolExecutor(1, thread_name_prefix="specctl-put")
            self._put_ctl = self.ctl.clone()  # a TCPStore client is not shared by threads
        assert self._put_ctl is not None
        self._busy = put.slot
        self._inflight = self._putter.submit(self._copy_and_publish, put, self._put_ctl)
        return self._inflight

    def flush(self) -> None:
        """Wait until the put in flight (`put_record_async`) is published or failed; its
        future holds which."""
        if self._inflight is not None:
            futures.wait([self._inflight])
            self._inflight, self._busy = None, None

    def _claim_put(self, buf: Any, epoch: int, index: int, T: int) -> _Put | None:
        """Check the header; the put `buffer` began for it, else claim the publication and
        count the put in our ledger."""
        # 1. read the header the packer wrote; it must be the sample we were told
        header = parse_header(memoryview(buf.numpy()))
        if (header.epoch, header.index, header.T) != (epoch, index, T):
            raise RecordError(
                f"record header is ({header.epoch}, {header.index}, T={header.T}), "
                f"put_record was told ({epoch}, {index}, T={T})"
            )
        placed = self._placed
        if placed is not None and placed.buf.data_ptr() == buf.data_ptr():
            if header.total_nbytes != placed.nbytes:
                raise RecordError(
                    f"record of {header.total_nbytes} bytes packed into a {placed.nbytes}-byte "
                    "buffer(..., sample)"
                )
            self._placed = None
            desc = Descriptor.for_header(
                header, run=self.run, producer=self.producer, put=placed.desc.put
            )
            placed.desc, placed.text = desc, desc.to_json()
            return placed
        # an object handed out for another record is not used; one prepared for this
        # sample is not either (the record was packed elsewhere): its claim is freed
        self._abandon([p] if (p := self._prepared.get((epoch, index))) else [])
        nbytes = header.total_nbytes
        put = self._claim_sample(epoch, index, T, nbytes, header)
        if put is None:
            return None
        buf = buf.reshape(-1)[:nbytes]
        put.buf, put.slot = buf, self._registered(buf, nbytes)
        if put.slot is None and not self.objects.mapped:  # a transfer needs a registered
            staged = self.buffer(nbytes)  # buffer: stage it through one of ours (a copy)
            staged.copy_(buf)
            put.buf, put.slot = staged, self._registered(staged, nbytes)
        return put

    def _claim_sample(
        self, epoch: int, index: int, T: int, nbytes: int, header: RecordHeader | None = None
    ) -> _Put | None:
        """Claim the publication of a sample (None: another producer has it) and count its
        put in our ledger, waiting while in-flight bytes are too high."""
        put = self._claim_pub(epoch, index, T, nbytes, header)
        if put is not None:
            self._count([put])
        return put

    def _claim_pub(
        self, epoch: int, index: int, T: int, nbytes: int, header: RecordHeader | None = None
    ) -> _Put | None:
        """Claim the publication of a sample: at most one producer ever puts it (None: not
        us). Without the packed record's `header` (not packed yet) the descriptor lacks its
        CRC until the put."""
        if nbytes > self.capacity:
            raise StoreError(
                f"record of {nbytes} bytes exceeds the store capacity {self.capacity}",
                hint="restart the store with a larger --capacity",
            )
        token = f"{self.id}/{next(_ids)}"  # unique per put: a repeat by this client loses too
        if self.ctl.claim(keys.pub(epoch, index), token) != token:
            return None
        if header is not None:
            desc = Descriptor.for_header(header, run=self.run, producer=self.producer, put=token)
        else:  # replaced by the header's once packed (`_claim_put`)
            desc = Descriptor(
                v=PROTOCOL_VERSION, key=record_key(self.run, epoch, index, token), run=self.run,
                epoch=epoch, index=index, nbytes=nbytes, T=T, crc=0, producer=self.producer,
                put=token,
            )  # fmt: skip
        return _Put(desc, desc.to_json(), None, None, nbytes)

    def _take_back(self, puts: list[_Put], ctl: Control) -> None:
        """Undo counted puts that will not be published (their claims are dropped)."""
        if not puts:
            return
        self._write_ledger(self._ledger.undone(p.desc.put for p in puts), ctl)
        for put in puts:
            ctl.delete(keys.pub(put.desc.epoch, put.desc.index))

    def _copy_and_publish(self, put: _Put, ctl: Control) -> Descriptor:
        """Write the record into its object (unless packed there), then publish and mark
        the claim published (the reaper keeps marked claims): a producer dying in between
        leaves a whole object the reaper publishes for it."""
        desc, nbytes = put.desc, put.nbytes
        pub = keys.pub(desc.epoch, desc.index)
        try:
            waits = put.waits
            if put.placed:
                pass  # packed into its object already
            elif self.objects.mapped:  # write the record into its object in the segment
                obj, waits = self.objects.reserve(desc.key, nbytes)
                obj.copy_(put.buf)
            else:
                waits = self.objects.put(desc.key, int(put.buf.data_ptr()), nbytes)
        except BaseException:
            self._take_back([put], ctl)
            raise
        self._write_ledger(self._ledger.written(desc.put, put.text), ctl)
        ctl.push(keys.RECORDS, put.text)
        self._ledger = self._ledger.published(desc.put)
        ctl.set_many({pub: desc.put + keys.PUBLISHED, keys.acct(self.id): self._ledger.dumps()})
        if waits:
            ctl.count("waits", waits)
        return desc

    def _write_ledger(self, ledger: Ledger, ctl: Control | None = None) -> None:
        (ctl or self.ctl).set(keys.acct(self.id), ledger.dumps())
        self._ledger = ledger

    def _registered(self, buf: Any, nbytes: int) -> Slot | None:
        """The send buffer holding buf's nbytes, if it is one of ours."""
        ptr = int(buf.data_ptr())
        return next((s for s in self._sends if s is not None and s.contains(ptr, nbytes)), None)

    def _count(self, puts: list[_Put], wait: bool = True) -> bool:
        """Count the puts in our ledger, then read what is in flight: above the high
        watermark the count is taken back while we wait for the low one (so a producer
        that dies waiting leaves nothing for the reaper to undo). `wait` False: returns
        False there instead, still counted, for the caller to `_take_back`."""
        rows = [(p.desc.put, p.nbytes, p.text) for p in puts]
        nbytes = sum(p.nbytes for p in puts)
        self._write_ledger(self._ledger.begin(rows))
        if self._fits(nbytes):
            self._unseen += nbytes
            return True
        cur = self._read_room()
        if cur == nbytes or cur <= self.high_wm:
            return True
        if not wait:
            return False
        self._write_ledger(self._ledger.undone(p.desc.put for p in puts))
        self._wait_for_room(cur - nbytes, nbytes)
        self._write_ledger(self._ledger.begin(rows))
        return True

    def inflight_bytes(self) -> int:
        """Bytes put and not yet acked, store-wide (one snapshot of the ledgers and counters)."""
        return self.ctl.counters(member=True)["inflight_bytes"]

    def wait_for_room(self, nbytes: int, give_up: Callable[[], bool] | None = None) -> bool:
        """Back-pressure before a put, as `put_record` applies it: when `nbytes` more would
        go above the high watermark, block until in-flight bytes fall below the low one.

        False when `give_up()` said so first (a producer whose run ended). Waiting here,
        before the put claims its sample, leaves nothing to undo when the caller stops.
        """
        if self._fits(nbytes):
            return True
        cur = self._read_room()
        if cur == 0 or cur + nbytes <= self.high_wm:
            return True
        return self._wait_for_room(cur, nbytes, give_up)

    def _fits(self, nbytes: int) -> bool:
        """Whether nbytes more surely stay below the high watermark, judged by the last
        reading of in-flight bytes: puts take up to a quarter of the room seen then before
        reading again (a round trip per put saved). A few producers together stay below the
        watermark; many may overshoot it, and then a full segment makes puts wait."""
        return self._unseen + nbytes <= self._room // 4

    def _read_room(self) -> int:
        """In-flight bytes now, noted as the room `_fits` goes by."""
        cur = self.inflight_bytes()
        self._room, self._unseen = self.high_wm - cur, 0
        return cur

    def _wait_for_room(
        self, cur: int, nbytes: int, give_up: Callable[[], bool] | None = None
    ) -> bool:
        """Block while in-flight bytes (`cur` now) are above the low watermark; False if
        `give_up()` returned True first."""
        t0 = last_log = time.monotonic()
        delay = 0.005
        while cur > 0 and cur + nbytes > self.low_wm:
            if give_up is not None and give_up():
                return False
            now = time.monotonic()
            if now - last_log > 30:
                log(
                    f"[store] waiting {now - t0:.0f}s for room: {cur} bytes in flight "
                    f"(high {self.high_wm}); is a trainer consuming?"
                )
                last_log = now
            time.sleep(delay)
            delay = min(delay * 1.5, 0.1)
            cur = self._read_room()
        self.ctl.count("waits", 1)
        return True

    # ------------------------------------------------------------------ consumer side

    def next_record(self, timeout_s: float | None = None) -> Received | None:
        """The next published record, checked (CRC, descriptor); None after timeout_s.

        When several descriptors are queued, up to `read_ahead` records are looked up (mapped
        segment) or fetched in one Mooncake call (one round trip instead of one each) and
        handed out by the following calls; each is claimed only when handed out, and
        `close` queues the rest again. At most half of what is left queued is taken ahead,
        so at the end of a run another consumer (a trainer rank waiting for its micro-batch)
        is not left without records while this one holds them. A corrupt or vanished record
        is logged, removed and its sample handed back to the producers; the next is tried.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            while self._ahead:
                got = self._claim(self._ahead.popleft())
                if got is not None:
                    return got
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            item = self.ctl.pop_wait(keys.RECORDS, left)
            if item is None:
                return None
            items = [item]
            extra = min(self.read_ahead - 1, self.ctl.qlen(keys.RECORDS) // 2)
            while len(items) <= extra and (more := self.ctl.pop(keys.RECORDS)):
                items.append(more)
            self._ahead.extend(self._fetch(items))

    def _fetch(self, items: list[str]) -> list[Received]:
        """Get and check published records (one batched get); those dropped are left out."""
        from specctl.pack import unpack_record

        descs = []
        for item in items:
            try:
                desc = Descriptor.from_json(item)
            except RecordError as e:
                log(f"[store] dropping a bad descriptor: {e}")
                self.ctl.count("corrupt", 1)
                continue
            # a stale descriptor (another run). A repeat of a delivered sample (a producer
            # presumed dead published it too) loses the delivery claim in `_claim`:
            # checking for it here as well would cost every record a round trip
            if desc.run != self.run:
                self._drop_repeat(desc)
                continue
            descs.append(desc)
        if not descs:
            return []
        slots, data = self._get(descs)
        out: list[Received] = []
        for i, (desc, slot, got) in enumerate(zip(descs, slots, data, strict=True)):
            try:
                if isinstance(got, int):
                    if got == NOT_FOUND or got in TRANSIENT:
                        raise RecordError(
                            f"object {desc.key} is missing or unreadable: {describe(got)}"
                        )
                    raise StoreError(f"get {desc.key!r}: {describe(got)}")
                record = unpack_record(got, verify=True)
                desc.check_matches(record.header)
            except RecordError as e:
                self._give(slot)
                self._reject(desc, e)
                continue
            except BaseException:
                for later in slots[i:]:
                    self._give(later)
                for kept in out:
                    self.release(kept)
                raise
            out.append(Received(desc, record, slot))
        return out

    def _get(self, descs: list[Descriptor]) -> tuple[list[Slot | None], list[Any]]:
        """Each record's bytes (a uint8 tensor) or Mooncake's code: in place in the mapped
        segment, else fetched into receive slots (one batched get)."""
        if self.objects.mapped:
            return [None] * len(descs), self.objects.views(
                [d.key for d in descs], [d.nbytes for d in descs]
            )
        taken = [self.slots.take(d.nbytes) for d in descs]
        try:
            sizes = self.objects.get_many(
                [d.key for d in descs], [s.ptr for s in taken], [s.nbytes for s in taken]
            )
        except BaseException:
            for slot in taken:
                self.slots.give(slot)
            raise
        data = [n if n < 0 else s.tensor[:n] for s, n in zip(taken, sizes, strict=True)]
        return list(taken), data

    def _give(self, slot: Slot | None) -> None:
        if slot is not None:
            self.slots.give(slot)

    def _reject(self, desc: Descriptor, why: RecordError) -> None:
        """A record that failed its checks: drop it, or hand its sample back to producers."""
        sid = (desc.epoch, desc.index)
        delivered = self.ctl.get(keys.got(*sid))
        if delivered is not None:  # its twin was delivered and acked
            self._drop_repeat(desc, delivered)
        else:
            log(f"[store] bad record {desc.key}: {why}; sample {sid} goes back to producers")
            self._hand_back(desc)

    def _claim(self, got: Received) -> Received | None:
        """Claim the delivery: exactly one consumer is handed each sample."""
        desc = got.descriptor
        token = f"{desc.put}>{self.id}/{next(_ids)}"
        delivered = self.ctl.claim(keys.got(desc.epoch, desc.index), token)
        if delivered != token:
            self.release(got)
            self._drop_repeat(desc, delivered)
            return None
        self._gets += 1  # counted with the next ack (a round trip per record saved)
        return got

    def _drop_repeat(self, desc: Descriptor, delivered: str | None = None) -> None:
        """Drop a stale descriptor or a repeat of a delivered sample (`delivered`: its
        delivery claim). A second descriptor of the same put (the reaper published it for
        a producer that died publishing) owns nothing: the put is drained by its twin."""
        log(f"[store] dropping a repeated or stale descriptor {desc.key}")
        if delivered is None or delivered.split(">", 1)[0] != desc.put:
            self._discard(desc)
        self.ctl.count("repeats", 1)

    def _discard(self, desc: Descriptor) -> None:
        self.objects.remove(desc.key)
        self._drain(desc.nbytes, 1)

    def _drain(self, nbytes: int, records: int) -> None:
        self.ctl.count("drained_bytes", nbytes)
        self.ctl.count("drained_records", records)

    def _hand_back(self, desc: Descriptor) -> None:
        """A bad record's sample goes back to the producers, once per put: its twin
        descriptor (same put) fails its checks too, and must not drain the put again."""
        token = f"{self.id}/{next(_ids)}"
        if self.ctl.claim(keys.back(desc.put), token) != token:
            log(f"[store] dropping a twin of the handed-back record {desc.key}")
            self.ctl.count("repeats", 1)
            return
        seq = self._seq(desc.epoch, desc.index)
        self._discard(desc)
        self.ctl.delete(keys.pub(desc.epoch, desc.index))
        self.ctl.push_seqs([seq])
        self.ctl.count("corrupt", 1)
        self.ctl.count("requeued", 1)

    def ack(self, received: list[Received]) -> None:
        """After the optimizer step: free the objects and the in-flight bytes, reuse slots.

        One batched remove and four counter updates per call, whatever the list length
        (records handed out since the last ack are counted as `gets` here).
        """
        if not received:
            return
        self.objects.remove_many([got.descriptor.key for got in received])
        self._drain(sum(got.descriptor.nbytes for got in received), len(received))
        self.ctl.count("acks", len(received))
        self._count_gets()
        for got in received:
            self.release(got)

    def _count_gets(self) -> None:
        if self._gets:
            self.ctl.count("gets", self._gets)
            self._gets = 0

    def release(self, got: Received) -> None:
        """Give a record's receive slot back without acking (its views become invalid)."""
        self._give(got.slot)
        got.slot = None

    def _unfetch(self) -> None:
        """Queue again the records fetched ahead and never handed out (still unclaimed)."""
        while self._ahead:
            got = self._ahead.popleft()
            self.ctl.push(keys.RECORDS, got.descriptor.to_json())
            self.release(got)

    def requeue_untrained(self, trained: set[tuple[int, int]]) -> int:
        """Trainer resume: every seq below the cursor not in `trained` goes back to the pool.

        Queued descriptors and every object of the run are cleared first. Call it before
        producers resume: a put in progress during the call (on the store's host, up to a
        prepared batch of them) may be delivered twice, or fail its CRC check and be
        produced again (its object was freed and may be reused).
        """
        self.ctl.pop_all(keys.RECORDS)
        while self._ahead:
            self.release(self._ahead.popleft())
        self.objects.remove_prefix(f"{self.run}/")
        counts = self.ctl.counters(member=True)
        self._drain(counts["inflight_bytes"], counts["inflight_records"])
        self.ctl.pop_all(keys.RETURNED)  # all below the cursor: re-derived just below
        cursor = self.ctl.cursor()[0]
        back = [seq for seq in range(cursor) if self._sid(seq) not in trained]
        for seq in back:
            self.ctl.delete(keys.pub(*self._sid(seq)))
            self.ctl.delete(keys.got(*self._sid(seq)))
        self.ctl.push_seqs(back)
        self.ctl.count("requeued", len(back))
        # a restarted (empty) store has forgotten what was trained: claim those samples as
        # published and delivered, so producers skip them and no stray copy is trained twice
        for sid in trained:
            self.ctl.claim(keys.pub(*sid), f"resume{keys.PUBLISHED}")
            self.ctl.claim(keys.got(*sid), "resume")
        return len(back)

    # ------------------------------------------------------------------ both

    def stats(self) -> dict[str, Any]:
        """Counters, queue lengths and capacity as the control plane sees them."""
        self._count_gets()
        out: dict[str, Any] = dict(self.ctl.counters(member=True))
        out.update(
            queued=self.ctl.qlen(keys.RECORDS),
            returned=self.ctl.qlen(keys.RETURNED),
            cursor=self.ctl.cursor()[0],
            capacity=self.capacity,
            high_wm=self.high_wm,
            low_wm=self.low_wm,
            run=self.run,
        )
        return out

    def close(self) -> None:
        """Hand back unfinished leases, stop heartbeats, free buffers, disconnect."""
        if self._stop.is_set():
            return
        self.flush()
        if self._putter is not None:
            self._putter.shutdown()
        try:
            self._abandon(self._prepared.values())
            self._count_gets()
            self.leases.release_all()
            self._unfetch()
            self.ctl.set(keys.left(self.id), "1")
        except StoreUnavailable:
            pass  # the store is gone: nothing to hand back to
        finally:
            self._stop.set()
            self._beat.join(timeout=5)
            self.slots.close()
            self.objects.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _objects(ctl: Control, master: str, store_host: str, host: str) -> Objects:
    """Our Mooncake client: mapping the segment when the store runs on this host (and its
    memfd opens here: not from another container), else by transfer."""
    where = ctl.get(keys.meta("segment"))
    same = is_loopback(store_host) or store_host == host
    if where and same and os.environ.get("SPECCTL_STORE_SHM", "1") != "0":
        try:
            return Objects(master, host=host, mapped=Where.loads(where))
        except OSError as e:
            log(f"[store] cannot map the segment ({e}); records go by transfer")
    return Objects(master, host=host)


def _local_host(store_host: str) -> str:
    """The address other store members reach this client at (loopback stays loopback)."""
    if is_loopback(store_host):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((store_host, 9))
        return str(s.getsockname()[0])
