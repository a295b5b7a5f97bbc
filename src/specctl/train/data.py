"""Records -> batches: from a directory of `*.rec` files or from the store, prefetched.

A `Batch` is one micro-batch, right-padded (padding has loss_mask 0; causal attention never
looks right, so no attention mask is needed). Ranks read disjoint samples:
- dir mode: one global order (sorted by sample id); optimizer step s takes the next
  world*batch*accum untrained samples and rank r takes its own slice of each micro-batch,
  so a run with the same global batch trains the same samples per step on any number of
  ranks; a short final block is dropped (every rank steps the same number of times);
- store mode: each rank pulls `next_record` on its own; records stay pinned in the store
  until the loop acks them after the optimizer step.
Held-out samples (a deterministic hash of the sample id) are never trained; they form the
evaluation slice for the `best` checkpoint.

Trap: the store client is not shared between threads here. The prefetch thread owns every
client call (next_record and ack); the loop hands finished batches back through a queue,
and the thread polls in short slices so acks never wait behind a long `next_record`
(producers blocked on in-flight bytes would otherwise never see the acks they wait for).
"""

from __future__ import annotations

import mmap
import queue
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from specctl.errors import InputError, RecordError

SampleId = tuple[int, int]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64
    loss_mask: torch.Tensor  # [B, T] uint8
    aux: torch.Tensor  # [B, T, k*H]
    last_hidden: torch.Tensor  # [B, T, H]
    ids: list[SampleId]
    lengths: list[int]
    handles: list[Any] = field(default_factory=list)  # store Received objects, acked after the step
    data_pass: int = 0  # dir mode: which pass over the directory
    replayed: int = 0  # a replay (replay.py) of this many samples; its `ids` are empty

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


def is_heldout(sample: SampleId, fraction: float) -> bool:
    """Deterministic: the same sample is held out on every rank, run and resume."""
    h = zlib.crc32(f"{sample[0]}:{sample[1]}".encode())
    return h < fraction * 2**32


def check_record(rec: Any, hidden_size: int, num_aux: int, where: str) -> None:
    """One-line InputError when a record does not fit the target/draft dimensions.

    `num_aux` 0 means the draft reads only `last_hidden` (MLP speculator): records with or
    without aux sections fit; a positive `num_aux` (EAGLE-3) needs the aux sections.
    """
    hd = rec.header
    if not hd.has_last:
        raise InputError(
            f"record {where} lacks the last hidden states",
            "produce records with `specctl serve-target` (--features all or last)",
        )
    if num_aux and not hd.has_aux:
        raise InputError(
            f"record {where} has no aux hidden states (serve-target --features last); "
            "the EAGLE-3 trainer needs them",
            "produce records with `serve-target --features all`, or train `--draft mlp`",
        )
    if hidden_size != hd.H or (num_aux and hd.num_aux != num_aux):
        raise InputError(
            f"record {where} has H={hd.H}, {hd.num_aux} aux layers; the target "
            f"config says H={hidden_size}, {num_aux} aux layers",
            "records and --target must come from the same model",
        )


def collate(
    records: list[Any],
    ids: list[SampleId],
    handles: list[Any] | None = None,
    with_aux: bool = True,
) -> Batch:
    """pack.Record views -> one right-padded Batch (copies, so record buffers may be reused).

    Without `with_aux` (or when records carry none) `aux` is an empty [B, T, 0] tensor.
    """
    t_max = max(r.header.T for r in records)
    b = len(records)
    first = records[0]
    with_aux = with_aux and all(r.aux_hidden is not None for r in records)
    k_h = first.aux_hidden.shape[1] if with_aux else 0
    input_ids = torch.zeros(b, t_max, dtype=torch.long)
    loss_mask = torch.zeros(b, t_max, dtype=torch.uint8)
    aux = torch.zeros(b, t_max, k_h, dtype=first.last_hidden.dtype)
    last = torch.zeros(b, t_max, first.last_hidden.shape[1], dtype=first.last_hidden.dtype)
    for i, r in enumerate(records):
        t = r.header.T
        input_ids[i, :t] = r.input_ids
        loss_mask[i, :t] = r.loss_mask
        if with_aux:
            aux[i, :t] = r.aux_hidden
        last[i, :t] = r.last_hidden
    return Batch(
        input_ids,
        loss_mask,
        aux,
        last,
        list(ids),
        [r.header.T for r in records],
        list(handles or []),
    )


def read_record(path: Path) -> Any:
    from specctl.pack import unpack_record

    return unpack_record(bytearray(path.read_bytes()), verify=True)


class DirSource:
    """The `*.rec` files of a directory, indexed by header once (dims checked up front)."""

    def __init__(
        self, path: Path, hidden_size: int, num_aux: int, heldout: float, max_heldout: int
    ) -> None:
        from specctl.protocol import parse_header

        files = sorted(Path(path).glob("*.rec")) if Path(path).is_dir() else []
        if not files:
            raise InputError(
                f"no *.rec record files in {path}",
                "write some with `specctl serve-target --to-dir DIR`",
            )
        index: list[tuple[SampleId, Path]] = []
        for f in files:
            try:  # mmap: the header check wants the whole length, we read only the header
                with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    hd = parse_header(memoryview(mm))
            except (ValueError, OSError, RecordError) as e:
                raise InputError(f"bad record file {f}: {e}") from None
            check_record(_HeaderOnly(hd), hidden_size, num_aux, str(f))
            index.append(((hd.epoch, hd.index), f))
        index.sort()
        self.train = [(s, f) for s, f in index if not is_heldout(s, heldout)]
        self.heldout = [(s, f) for s, f in index if is_heldout(s, heldout)][:max_heldout]

    def steps(
        self, trained: set[SampleId], rank: int, world: int, batch: int, accum: int
    ) -> Iterator[list[list[tuple[SampleId, Path]]]]:
        """Per optimizer step: this rank's `accum` micro-batches of (id, path)."""
        todo = [(s, f) for s, f in self.train if s not in trained]
        block = world * batch * accum
        for a in range(0, len(todo) - block + 1, block):
            chunk = todo[a : a + block]
            yield [
                chunk[(m * world + rank) * batch : (m * world + rank + 1) * batch]
                for m in range(accum)
            ]


@dataclass
class _HeaderOnly:
    header: Any


def load_batch(items: list[tuple[SampleId, Path]], hidden_size: int, num_aux: int) -> Batch:
    records = [read_record(f) for _, f in items]
    for (_, f), r in zip(items, records, strict=True):
        check_record(r, hidden_size, num_aux, str(f))
    return collate(records, [s for s, _ in items], with_aux=num_aux > 0)


class Prefetcher:
    """Runs `produce(put, done_handles)` in a thread; `get()` returns the next item or None at end.

    `produce` calls `put(item)` per optimizer step and may poll `self.pending_acks()` to act on
    handles the loop finished with (`ack(handles)`); exceptions surface in `get()`.
    """

    def __init__(self, produce: Callable[[Prefetcher], None], depth: int = 2) -> None:
        self._q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._acks: queue.Queue[list[Any]] = queue.Queue()
        self.stop = threading.Event()
        self.wait_s = 0.0
        self._thread = threading.Thread(
            target=self._run, args=(produce,), daemon=True, name="specctl-prefetch"
        )
        self._thread.start()

    def _run(self, produce: Callable[[Prefetcher], None]) -> None:
        try:
            produce(self)
            self._put(("end", None))
        except BaseException as e:  # surfaced in the training thread
            self._put(("error", e))

    def _put(self, item: tuple[str, Any]) -> None:
        while not self.stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def put(self, item: Any) -> bool:
        """From the producer thread; False when the loop is shutting down."""
        self._put(("ok", item))
        return not self.stop.is_set()

    def get(self) -> Any:
        t0 = time.monotonic()
        kind, item = self._q.get()
        self.wait_s += time.monotonic() - t0
        if kind == "error":
            raise item
        return item if kind == "ok" else None

    def ack(self, handles: list[Any]) -> None:
        if handles:
            self._acks.put(handles)

    def pending_acks(self) -> list[Any]:
        out: list[Any] = []
        while True:
            try:
                out.extend(self._acks.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=10)
