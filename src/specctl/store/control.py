"""Control plane: key names and a thin wrapper over `torch.distributed.TCPStore`.

The control plane carries only small strings: run facts, counters, heartbeats, prompt
leases and the descriptor queue. `specctl store up` hosts the TCPStore; everyone else is a
client of it. The keys (all under one store, one run per store):

| key                    | kind    | meaning |
|------------------------|---------|---------|
| `meta/<name>`          | value   | store facts: master, metrics, run, capacity, high_wm, low_wm, lease_ttl_s |
| `run/<name>`           | value   | `Client.run_meta` (set once; e.g. num_prompts) |
| `cursor`               | value   | `<next fresh seq>|<mover>`, moved by compare-and-set |
| `q/records`            | queue   | descriptor JSON of every published record |
| `q/returned`           | queue   | seqs handed back (dead producer, corrupt record, resume); leased first |
| `pub/<epoch>/<index>`  | value   | publication claim: `<client>/<n>` of the owning put, `!` once pushed |
| `got/<epoch>/<index>`  | value   | delivery claim: the consumer that was handed this sample |
| `back/<put>`           | value   | hand-back claim: the consumer that handed back this put's bad record |
| `lease/<client>`       | value   | JSON list of the seqs a producer holds and has not finished |
| `acct/<client>`        | value   | a producer's ledger: its put totals and its puts in progress (ledger.py) |
| `clients`              | append  | `role|id;` for every client that ever connected |
| `hb/<client>`          | counter | heartbeat, bumped every lease_ttl/3 |
| `left/<client>`        | value   | set by a clean `close()` |
| `n/<counter>`          | counter | drained_bytes, drained_records, gets, acks, requeued, corrupt, repeats, waits |
| `stats/<name>`         | value   | rates the server publishes each second |
| `ctl/shutdown`         | value   | `store down` sets it; the server exits cleanly |

`counters()` adds the derived counts: puts and put_bytes (sums of the ledgers) and
inflight_bytes/inflight_records (those sums minus the drained counts).

TCPStore traps: a blocking `queue_pop` that times out may still take the next item on the
server after the client gave up (that item would be lost), so we only pop non-blocking and
poll. Queue keys are invisible to `check`/`list_keys`. `compare_set(k, "", v)` sets a
missing key and returns the stored value otherwise, so it doubles as an atomic claim. One
TCPStore client object is not shared between threads: background threads `clone()` it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from specctl.errors import StoreUnavailable
from specctl.store.ledger import Ledger

RECORDS = "q/records"
RETURNED = "q/returned"
CURSOR = "cursor"
PUBLISHED = "!"  # suffix of a publication claim whose descriptor was pushed
CLIENTS = "clients"
SHUTDOWN = "ctl/shutdown"
COUNTERS = (
    "drained_bytes",
    "drained_records",
    "gets",
    "acks",
    "requeued",
    "corrupt",
    "repeats",
    "waits",
)


def meta(name: str) -> str:
    return f"meta/{name}"


def pub(epoch: int, index: int) -> str:
    return f"pub/{epoch}/{index}"


def got(epoch: int, index: int) -> str:
    return f"got/{epoch}/{index}"


def back(put: str) -> str:
    return f"back/{put}"


def acct(client_id: str) -> str:
    return f"acct/{client_id}"


def lease(client_id: str) -> str:
    return f"lease/{client_id}"


def hb(client_id: str) -> str:
    return f"hb/{client_id}"


def left(client_id: str) -> str:
    return f"left/{client_id}"


def counter(name: str) -> str:
    return f"n/{name}"


_ABSENT = "\x00specctl-absent"  # no value is ever this: compare_set answers it for a missing key
_ABSENT_BYTES = _ABSENT.encode()


class _Guarded:
    """Forwards to a TCPStore; a lost connection becomes StoreUnavailable, not a c10d error."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        import torch.distributed as dist

        fn = getattr(self._store, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except dist.QueueEmptyError:
                raise
            except dist.DistError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise StoreUnavailable(
                    f"lost the store's control plane: {first}",
                    hint="is `specctl store up` still running?",
                ) from None

        return call


class Control:
    """TCPStore client (or the hosting master) with the few operations specctl needs."""

    def __init__(self, store: Any) -> None:
        self.store = _Guarded(store)

    @classmethod
    def connect(cls, host: str, port: int, timeout_s: float) -> Control:
        """Connect as a client, failing within ~timeout_s even if the peer never answers.

        TCPStore's client handshake blocks in recv() with no timeout when something accepts
        the TCP connection but does not speak the TCPStore protocol (a wrong address), so
        the connect runs in a daemon thread that we abandon on timeout.
        """
        import threading

        import torch.distributed as dist

        t = timedelta(seconds=max(timeout_s, 1.0))
        result: list[Any] = []

        def attempt() -> None:
            try:
                result.append(dist.TCPStore(host, port, None, False, t, wait_for_workers=False))
            except Exception as e:  # surfaced below as a one-line StoreUnavailable
                result.append(e)

        th = threading.Thread(target=attempt, name="tcpstore-connect", daemon=True)
        th.start()
        th.join(max(timeout_s, 1.0) + 1.0)
        if not result:
            raise StoreUnavailable(
                f"{host}:{port} accepted the connection but never answered as a specctl store",
                hint="check the address printed by `specctl store up`",
            )
        if isinstance(result[0], Exception):
            raise StoreUnavailable(
                f"cannot reach the store control plane at {host}:{port}: "
                f"{str(result[0]).splitlines()[0]}"
            )
        return cls(result[0])

    @classmethod
    def host(cls, listener: socket.socket) -> Control:
        """Host the TCPStore on an already bound socket; TCPStore owns (and closes) its fd."""
        import torch.distributed as dist

        host, port = listener.getsockname()[:2]
        s = dist.TCPStore(
            host,
            port,
            None,
            True,
            timedelta(seconds=30),
            wait_for_workers=False,
            master_listen_fd=listener.detach(),
        )
        return cls(s)

    def clone(self) -> Control:
        return Control(self.store.clone())

    # values
    def get(self, key: str, default: str | None = None) -> str | None:
        """The value, or `default` when the key does not exist. TCPStore's `get` blocks until
        a key exists (a `check` first races a `delete`: a lease key deleted in between made
        a producer time out), so this reads with `compare_set(key, ABSENT, ABSENT)`: the
        current value, or ABSENT for a missing key (never set), in one round trip."""
        got = bytes(self.store.compare_set(key, _ABSENT, _ABSENT))
        return default if got == _ABSENT_BYTES else got.decode()

    def set(self, key: str, value: str) -> None:
        self.store.set(key, value)

    def set_many(self, items: dict[str, str]) -> None:
        """Several values in one round trip (TCPStore multi_set)."""
        self.store.multi_set(list(items), list(items.values()))

    def claim(self, key: str, value: str) -> str:
        """Atomically set key if missing; returns the value now stored (ours if we won)."""
        return bytes(self.store.compare_set(key, "", value)).decode()

    def cursor(self) -> tuple[int, str]:
        """The next fresh seq and the cursor's raw value (`"<seq>|<who moved it>"`)."""
        raw = self.get(CURSOR, "") or ""
        return (int(raw.split("|", 1)[0]) if raw else 0), raw

    def move_cursor(self, raw: str, end: int, token: str) -> bool:
        """Compare-and-set the cursor from `raw` to `end`; True if we moved it.

        The value carries the mover's unique token, so two producers moving it from the
        same start to the same end cannot both believe they won (compare_set returns the
        stored value, which would otherwise be equal for both).
        """
        desired = f"{end}|{token}"
        return bytes(self.store.compare_set(CURSOR, raw, desired)).decode() == desired

    def delete(self, key: str) -> None:
        self.store.delete_key(key)

    def append(self, key: str, value: str) -> None:
        self.store.append(key, value)

    # counters
    def add(self, name: str, n: int) -> int:
        return int(self.store.add(name, n))

    def count(self, name: str, n: int = 1) -> int:
        return self.add(counter(name), n)

    def init_counters(self) -> None:
        """Create every counter (at 0), so `counters()` reads them in one round trip."""
        for name in COUNTERS:
            self.count(name, 0)

    def counters(self, member: bool = False) -> dict[str, int]:
        """Every counter, the ledgers' sums and what is in flight, read in one snapshot.

        `member`: the caller is a registered client of a ready store, so every key exists
        (the server creates the counters before `ready`, `register` the ledger before
        listing the client) and two round trips do; otherwise existence is checked first.
        """
        ids = [cid for _, cid in self.clients(member)]
        names = [acct(cid) for cid in ids] + [counter(name) for name in COUNTERS]
        if member or self.store.check(names):
            raw = self.store.multi_get(names)
        else:  # a store whose counters were never created: read one by one
            raw = [(self.get(k) or Ledger().dumps()).encode() for k in names[: len(ids)]]
            raw += [str(self.count(name, 0)).encode() for name in COUNTERS]
        ledgers = [Ledger.loads(bytes(r)) for r in raw[: len(ids)]]
        out = {name: int(bytes(r)) for name, r in zip(COUNTERS, raw[len(ids) :], strict=True)}
        out["puts"] = sum(x.puts for x in ledgers)
        out["put_bytes"] = sum(x.put_bytes for x in ledgers)
        out["inflight_records"] = out["puts"] - out["drained_records"]
        out["inflight_bytes"] = out["put_bytes"] - out["drained_bytes"]
        return out

    def ledger(self, client_id: str) -> Ledger:
        raw = self.get(acct(client_id))
        return Ledger.loads(raw) if raw else Ledger()

    def register(self, role: str, client_id: str) -> None:
        """Announce a client, its ledger first: every listed client has one (any role may put)."""
        self.set(acct(client_id), Ledger().dumps())
        self.add(hb(client_id), 1)
        self.append(CLIENTS, f"{role}|{client_id};")

    # queues
    def push(self, queue: str, value: str) -> None:
        self.store.queue_push(queue, value)

    def pop(self, queue: str) -> str | None:
        """Non-blocking pop; None if empty."""
        import torch.distributed as dist

        try:
            return bytes(self.store.queue_pop(queue, False)).decode()
        except dist.QueueEmptyError:
            return None

    def pop_wait(self, queue: str, timeout_s: float | None) -> str | None:
        """Poll-pop until an item arrives or timeout_s passes (None waits forever)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delay = 0.001
        while True:
            item = self.pop(queue)
            if item is not None:
                return item
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(delay)
            delay = min(delay * 1.5, 0.02)

    def pop_all(self, queue: str) -> list[str]:
        items = []
        while (item := self.pop(queue)) is not None:
            items.append(item)
        return items

    def qlen(self, queue: str) -> int:
        return int(self.store.queue_len(queue))

    def push_seqs(self, seqs: Iterable[int]) -> None:
        for seq in seqs:
            self.push(RETURNED, str(seq))

    def clients(self, member: bool = False) -> list[tuple[str, str]]:
        """(role, id) of every client that ever connected, in connection order (`member`:
        the caller is one of them, so the key exists and one round trip does)."""
        raw = bytes(self.store.get(CLIENTS)).decode() if member else self.get(CLIENTS, "") or ""
        out = []
        for item in raw.split(";"):
            if "|" in item:
                role, cid = item.split("|", 1)
                out.append((role, cid))
        return out
