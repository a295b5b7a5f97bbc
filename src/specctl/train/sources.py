"""Where a run's samples come from: a directory of records or the store.

Both expose the same small surface to the loop: `first_samples()` (rank 0's records for
the vocab count), `produce(prefetcher)` (the prefetch thread body: one item per optimizer
step = this rank's micro-batches), `on_step(group, state)` (before a step: bookkeeping the
thread cannot do), `heldout_batches()` (identical on every rank), `finish`, `close`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from specctl.draft.eagle3 import Eagle3Config
from specctl.draft.mlp import MLPSpeculatorConfig
from specctl.errors import InputError, StoreError
from specctl.train import parallel
from specctl.train.checkpoint import TrainerState
from specctl.train.data import (
    Batch,
    DirSource,
    Prefetcher,
    SampleId,
    check_record,
    collate,
    is_heldout,
    load_batch,
    read_record,
)
from specctl.train.replay import ReplaySpool
from specctl.train.run_config import TrainDraftConfig

DraftConfig = Eagle3Config | MLPSpeculatorConfig


def record_dims(dcfg: DraftConfig) -> tuple[int, int]:
    """(H, aux layers the draft reads): an MLP speculator reads `last_hidden` only (0 aux)."""
    if isinstance(dcfg, MLPSpeculatorConfig):
        return dcfg.emb_dim, 0
    return dcfg.target_hidden_size, dcfg.num_aux


def open_source(
    cfg: TrainDraftConfig, env: parallel.Dist, dcfg: DraftConfig, out: Path, state: TrainerState
) -> DirStream | StoreStream:
    if bool(cfg.from_dir) == bool(cfg.store):
        raise InputError("give exactly one of --store ADDR and --from-dir DIR")
    if cfg.from_dir:
        return DirStream(cfg, env, dcfg, state)
    return StoreStream(cfg, env, dcfg, out, state)


def _batches(items: list[tuple[SampleId, Path]], n: int, dims: tuple[int, int]) -> list[Batch]:
    """Held-out (id, file) items -> batches of `n` (the last one may be short)."""
    return [load_batch(items[a : a + n], *dims) for a in range(0, len(items), n)]


class DirStream:
    def __init__(
        self, cfg: TrainDraftConfig, env: parallel.Dist, dcfg: DraftConfig, state: TrainerState
    ) -> None:
        self.cfg, self.env, self.state = cfg, env, state
        self.dims = record_dims(dcfg)
        self.src = DirSource(Path(str(cfg.from_dir)), *self.dims, cfg.heldout, cfg.max_heldout)
        self.start_samples, self.start_tokens = state.samples, state.tokens
        self._heldout: list[Batch] | None = None

    def first_samples(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _, f in self.src.train[: self.cfg.draft.vocab_records]:
            r = read_record(f)
            yield r.input_ids, r.loss_mask

    def produce(self, pf: Prefetcher) -> None:
        c, env = self.cfg, self.env
        trained, data_pass = set(self.state.trained), self.state.data_pass
        while data_pass < c.epochs:
            for items in self.src.steps(trained, env.rank, env.world, c.batch_size, c.grad_accum):
                group = [load_batch(m, *self.dims) for m in items]
                for b in group:
                    b.data_pass = data_pass
                if not pf.put(group):
                    return
            data_pass, trained = data_pass + 1, set()

    def on_step(self, group: list[Batch], state: TrainerState) -> None:
        if group and group[0].data_pass > state.data_pass:  # a new pass: ids may repeat
            state.data_pass, state.trained = group[0].data_pass, set()

    def heldout_batches(self) -> list[Batch]:
        if self._heldout is None:
            self._heldout = _batches(self.src.heldout, self.cfg.batch_size, self.dims)
        return self._heldout

    def finish(self, pf: Prefetcher) -> None:
        pass

    def close(self) -> None:
        pass


class StoreStream:
    """Records from the store; held-out ones are saved under OUT/heldout/ and acked at once."""

    FILL_WAIT_S = 1.0  # how long a partly filled micro-batch waits for more records
    REPLAY_POLL_S = 0.05  # how long a micro-batch waits for a fresh record before a replay

    def __init__(
        self,
        cfg: TrainDraftConfig,
        env: parallel.Dist,
        dcfg: DraftConfig,
        out: Path,
        state: TrainerState,
    ) -> None:
        from specctl.store.client import Client

        self.cfg, self.env = cfg, env
        self.dims = record_dims(dcfg)
        self.start_samples, self.start_tokens = state.samples, state.tokens
        self.heldout_dir = out / "heldout"
        self.heldout_dir.mkdir(exist_ok=True)
        self.client = Client.connect(cfg.store, role="trainer")
        if cfg.resume and env.is_main:  # before anyone pulls: untrained samples come back
            n = self.client.requeue_untrained(state.trained | state.heldout_seen)
            from specctl.console import log

            log(f"resume: {n} untrained samples handed back to the producers")
        parallel.barrier()
        self._pre: list[Any] = []
        self._ever = False
        self._lock = threading.Lock()
        self._held_new: list[tuple[int, int]] = []
        self._held_files: list[str] = []
        self._held_batches: list[Batch] = []
        self.replay = ReplaySpool(cfg.replay, cfg.replay_gap, cfg.replay_mb << 20)

    def first_samples(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Rank 0 pulls the first records (kept for training) and yields them for counting."""
        wait = self.cfg.max_wait_s
        while len(self._pre) < self.cfg.draft.vocab_records:
            got = self._next(None, wait)
            if got is None:
                break
            self._pre.append(got)
            wait = self.FILL_WAIT_S
        if not self._pre:
            self._no_data()
        for got in self._pre:
            yield got.record.input_ids, got.record.loss_mask

    def produce(self, pf: Prefetcher) -> None:
        c = self.cfg
        while not pf.stop.is_set():
            group: list[Batch] = []
            for _ in range(c.grad_accum):
                recs = self._fresh(pf, first=not group)
                if recs:
                    ids = [(g.descriptor.epoch, g.descriptor.index) for g in recs]
                    records = [g.record for g in recs]
                    b = collate(records, ids, handles=recs, with_aux=self.dims[1] > 0)
                    self.replay.add(b)
                    group.append(b)
                elif (again := self.replay.take()) is not None:
                    group.append(again)
                else:
                    break
            if not group:
                if not self._ever:
                    self._no_data()
                return
            if not pf.put(group):
                return

    def _fresh(self, pf: Prefetcher, first: bool) -> list[Any]:
        """Up to batch_size fresh records for one micro-batch. The first waits --max-wait
        (FILL_WAIT_S if the group has one already), or only REPLAY_POLL_S while a replay is
        ready to take its place; the others FILL_WAIT_S."""
        recs: list[Any] = []
        while len(recs) < self.cfg.batch_size:
            if self._pre:
                got = self._pre.pop(0)
            else:
                if recs:
                    wait = self.FILL_WAIT_S
                elif self.replay.ready():
                    wait = self.REPLAY_POLL_S
                else:
                    wait = self.cfg.max_wait_s if first else self.FILL_WAIT_S
                got = self._next(pf, wait)
            if got is None:
                break
            recs.append(got)
        return recs

    def _no_data(self) -> None:
        raise StoreError(
            f"no records arrived from the store within --max-wait {self.cfg.max_wait_s:g}s",
            "start `specctl serve-target` on this store",
        )

    def _poll(self, pf: Prefetcher | None, timeout: float) -> Any:
        """next_record in short slices, acking finished batches in between (see data.py)."""
        deadline = time.monotonic() + timeout
        while pf is None or not pf.stop.is_set():
            if pf is not None:
                self.client.ack(pf.pending_acks())
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            got = self.client.next_record(min(0.2, left))
            if got is not None:
                return got
        return None

    def _next(self, pf: Prefetcher | None, timeout: float) -> Any:
        """The next trainable record within `timeout` (dims checked, held-out ones diverted)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self._poll(pf, max(0.0, deadline - time.monotonic()))
            if got is None:
                return None
            self._ever = True
            d = got.descriptor
            check_record(got.record, *self.dims, d.key)
            if not is_heldout((d.epoch, d.index), self.cfg.heldout):
                return got
            self._keep_heldout(got)

    def _keep_heldout(self, got: Any) -> None:
        from specctl.pack import pack_record
        from specctl.paths import write_atomic

        r, d = got.record, got.descriptor
        if len(list(self.heldout_dir.glob("*.rec"))) < self.cfg.max_heldout:
            buf = pack_record(
                epoch=d.epoch,
                index=d.index,
                input_ids=r.input_ids,
                loss_mask=r.loss_mask,
                aux_hidden=r.aux_hidden,
                last_hidden=r.last_hidden,
                dtype=r.last_hidden.dtype,
            )
            write_atomic(self.heldout_dir / f"{d.epoch:08d}-{d.index:08d}.rec", buf.numpy().data)
        self.client.ack([got])
        with self._lock:
            self._held_new.append((d.epoch, d.index))

    def on_step(self, group: list[Batch], state: TrainerState) -> None:
        with self._lock:
            state.heldout_seen.update(self._held_new)
            self._held_new.clear()

    def heldout_batches(self) -> list[Batch]:
        """The same list on every rank: rank 0's listing of OUT/heldout, broadcast."""
        names = sorted(p.name for p in self.heldout_dir.glob("*.rec"))[: self.cfg.max_heldout]
        names = parallel.broadcast_object(names)
        if names != self._held_files:
            self._held_files = names
            items = [((0, 0), self.heldout_dir / n) for n in self._held_files]
            self._held_batches = _batches(items, self.cfg.batch_size, self.dims)
        return self._held_batches

    def finish(self, pf: Prefetcher) -> None:
        self.client.ack(pf.pending_acks())

    def close(self) -> None:
        self.client.close()
