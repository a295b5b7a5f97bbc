"""Where packed records go: the store (leases + put) or a folder (`--to-dir`, offline mode).

Both give the producer the same calls: `lease(n)` -> seqs (None when the run is done),
`prepare([(nbytes, (epoch, index, T)), ...])` for a capture batch, `buffer(nbytes, (epoch,
index, T))` to pack into, `put(buf, epoch, index, T)` -> a future
whose result is truthy when the put published the sample, `flush()` (wait for puts in
flight), `done(seq)`.

Store: seqs are leased from the control plane, so N producers share one prompt space; a
producer that dies leaves its unfinished seqs to come back (heartbeat TTL). On the store's
host the buffer is the sample's object in the mapped segment (the record is packed where
the trainer reads it); elsewhere the put is `put_record_async`, which transfers and
publishes record n while the producer packs n + 1. Its result is None when another producer
already published the sample (a re-issued lease); that counts as done, not as an error.
A sink also carries the run's `dedup` (store: a run-wide claim on the control plane;
folder: this producer's set) and, once `lease` returns None, why it stopped (`stopped`).

Store, endless producers only (`--epochs 0`; finite runs end at their limit as before): the
run is over (`lease` returns None, `stopped` says why) when `store down` set `ctl/shutdown`
or every trainer that joined the store has left cleanly (`left/<id>`) and stays so for
TRAINER_GRACE_S (a trainer may close a short-lived client, e.g. its resume hand-back, before
its main one connects). Checked before each lease and while a put waits for room, so an
endless producer does not block on back-pressure forever after the trainer finished.
Folder: seqs are walked in order; a sample whose file exists is skipped (so a rerun resumes),
and each file is written as `.tmp` then renamed, so a reader never sees half a record.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from specctl.paths import write_atomic
from specctl.target.dedup import Dedup
from specctl.target.engines import Engine

RUN_OVER_POLL_S = 2.0  # how often a producer waiting for room looks for the trainer's exit
TRAINER_GRACE_S = 10.0  # all trainers gone this long: the run is over


class RunOver(Exception):
    """Raised from `buffer` while waiting for room when the run is over: stop producing."""


class StoreSink:
    def __init__(
        self,
        address: str | None,
        num_prompts: int,
        limit: int | None,
        engine: Engine,
        features: str = "all",
        endless: bool = False,
    ) -> None:
        from specctl.store import Client

        self.client = Client.connect(address, role="producer")
        self.limit = limit
        self.dedup = Dedup(self.client.ctl.claim)
        self.stopped: str | None = None
        self.endless = endless
        self._checked = 0.0
        self._all_left_since: float | None = None
        try:
            self.client.run_meta("num_prompts", str(num_prompts))
            self.client.run_meta("target.hidden_size", str(engine.hidden_size))
            self.client.run_meta("target.aux_layers", ",".join(map(str, engine.aux_layers)))
            self.client.run_meta("target.features", features)  # all producers of a run agree
        except BaseException:
            self.client.close()
            raise

    def lease(self, n: int) -> list[int] | None:
        if self.run_over(force=True):
            return None
        lease = self.client.lease_prompts(n, limit=self.limit)
        return None if lease is None else list(lease.seqs)

    def run_over(self, force: bool = False) -> bool:
        """Endless runs: the store is shutting down, or every trainer that joined left (for
        TRAINER_GRACE_S; `force` waits that grace out here instead of on later calls)."""
        from specctl.store import control as keys

        now = time.monotonic()
        if not self.endless or (not force and now - self._checked < RUN_OVER_POLL_S):
            return False
        while True:
            self._checked = now
            ctl = self.client.ctl
            if ctl.get(keys.SHUTDOWN):
                self.stopped = "store shutting down"
                return True
            trainers = [cid for role, cid in ctl.clients() if role == "trainer"]
            if not (trainers and all(ctl.get(keys.left(cid)) for cid in trainers)):
                self._all_left_since = None
                return False
            self._all_left_since = self._all_left_since or now
            if now - self._all_left_since >= TRAINER_GRACE_S:
                self.stopped = "trainer finished"
                return True
            if not force:
                return False
            time.sleep(1.0)
            now = time.monotonic()

    def prepare(self, records: list[tuple[int, tuple[int, int, int]]]) -> None:
        """On the store's host: begin a capture batch's puts at once (`Client.prepare`)."""
        if records:
            self._wait(records[0][0])  # as its first `buffer` would (prepare never waits)
            self.client.prepare(records)

    def buffer(self, nbytes: int, sample: tuple[int, int, int] | None = None) -> torch.Tensor:
        # On the store's host the buffer is the sample's object itself (packed in place);
        # a prepared one is counted already, the others wait for room here
        if sample is None or not self.client.is_prepared(sample[0], sample[1]):
            self._wait(nbytes)
        return self.client.buffer(nbytes, sample)

    def _wait(self, nbytes: int) -> None:
        """Wait for room here, giving up when the run is over; the put then finds room."""
        if not self.client.wait_for_room(nbytes, give_up=self.run_over):
            raise RunOver(self.stopped or "")

    def put(self, buf: torch.Tensor, epoch: int, index: int, T: int) -> Future[Any]:
        return self.client.put_record_async(buf, epoch=epoch, index=index, T=T)

    def flush(self) -> None:
        self.client.flush()

    def done(self, seq: int) -> None:
        self.client.leases.finish([seq])  # its lease may be an earlier one (a put in flight)

    def inflight_bytes(self) -> int:
        return self.client.inflight_bytes()

    def close(self) -> None:
        self.client.close()  # unfinished seqs go back to the pool


def finished(published: bool) -> Future[bool]:
    """What a sink that puts synchronously returns from `put`."""
    done: Future[bool] = Future()
    done.set_result(published)
    return done


class LocalSink:
    """The parts of a one-producer sink with nothing in flight: a reused pack buffer, no-op acks."""

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8)
        self.dedup = Dedup()
        self.stopped: str | None = None

    def buffer(self, nbytes: int, sample: tuple[int, int, int] | None = None) -> torch.Tensor:
        if self._buf.numel() < nbytes:
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._buf[:nbytes]

    def prepare(self, records: list[tuple[int, tuple[int, int, int]]]) -> None:
        pass

    def done(self, seq: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def inflight_bytes(self) -> int:
        return 0

    def close(self) -> None:
        pass


class DirSink(LocalSink):
    def __init__(
        self, folder: Path, num_prompts: int, limit: int | None, meta: dict[str, Any]
    ) -> None:
        super().__init__()
        self.folder = folder
        self.num_prompts = num_prompts
        self.limit = limit
        self.next_seq = 0
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            from specctl.errors import InputError

            raise InputError(f"cannot create --to-dir {folder}: {e.strerror}") from None
        _claim_meta(folder / "meta.json", {"num_prompts": num_prompts, **meta})

    def path(self, epoch: int, index: int) -> Path:
        return self.folder / f"{epoch}_{index}.rec"

    def lease(self, n: int) -> list[int] | None:
        seqs: list[int] = []
        while len(seqs) < n and (self.limit is None or self.next_seq < self.limit):
            epoch, index = divmod(self.next_seq, self.num_prompts)
            if not self.path(epoch, index).exists():
                seqs.append(self.next_seq)
            self.next_seq += 1
        return seqs or None

    def put(self, buf: torch.Tensor, epoch: int, index: int, T: int) -> Future[bool]:
        write_atomic(self.path(epoch, index), buf.numpy().data)
        return finished(True)


def _claim_meta(path: Path, meta: dict[str, Any]) -> None:
    """Like the store's run_meta: the first writer sets it, later runs must agree."""
    from specctl.errors import InputError

    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(meta)):
            raise InputError(
                f"{path.parent} holds records of another run ({path.name}: {old})",
                "use an empty --to-dir",
            )
        return
    write_atomic(path, (json.dumps(meta, sort_keys=True) + "\n").encode())
