"""Where packed records go: the store (leases + put) or a folder (`--to-dir`, offline mode).

Both give the producer the same four calls: `lease(n)` -> seqs (None when the run is done),
`buffer(nbytes)` to pack into, `put(buf, epoch, index, T)` -> published or not, `done(seq)`.

Store: seqs are leased from the control plane, so N producers share one prompt space; a
producer that dies leaves its unfinished seqs to come back (heartbeat TTL). `put_record`
returns None when another producer already published the sample (a re-issued lease); that
counts as done, not as an error.
Folder: seqs are walked in order; a sample whose file exists is skipped (so a rerun resumes),
and each file is written as `.tmp` then renamed, so a reader never sees half a record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from specctl.paths import write_atomic
from specctl.target.engines import Engine


class StoreSink:
    def __init__(self, address: str | None, num_prompts: int, limit: int, engine: Engine) -> None:
        from specctl.store import Client

        self.client = Client.connect(address, role="producer")
        self.limit = limit
        self._lease: Any = None
        try:
            self.client.run_meta("num_prompts", str(num_prompts))
            self.client.run_meta("target.hidden_size", str(engine.hidden_size))
            self.client.run_meta("target.aux_layers", ",".join(map(str, engine.aux_layers)))
        except BaseException:
            self.client.close()
            raise

    def lease(self, n: int) -> list[int] | None:
        self._lease = self.client.lease_prompts(n, limit=self.limit)
        return None if self._lease is None else list(self._lease.seqs)

    def buffer(self, nbytes: int) -> torch.Tensor:
        return self.client.buffer(nbytes)

    def put(self, buf: torch.Tensor, epoch: int, index: int, T: int) -> bool:
        return self.client.put_record(buf, epoch=epoch, index=index, T=T) is not None

    def done(self, seq: int) -> None:
        self._lease.done(seq)

    def inflight_bytes(self) -> int:
        return int(self.client.stats().get("inflight_bytes", 0))

    def close(self) -> None:
        self.client.close()  # unfinished seqs go back to the pool


class LocalSink:
    """The parts of a one-producer sink with nothing in flight: a reused pack buffer, no-op acks."""

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8)

    def buffer(self, nbytes: int) -> torch.Tensor:
        if self._buf.numel() < nbytes:
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._buf[:nbytes]

    def done(self, seq: int) -> None:
        pass

    def inflight_bytes(self) -> int:
        return 0

    def close(self) -> None:
        pass


class DirSink(LocalSink):
    def __init__(self, folder: Path, num_prompts: int, limit: int, meta: dict[str, Any]) -> None:
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
        while len(seqs) < n and self.next_seq < self.limit:
            epoch, index = divmod(self.next_seq, self.num_prompts)
            if not self.path(epoch, index).exists():
                seqs.append(self.next_seq)
            self.next_seq += 1
        return seqs or None

    def put(self, buf: torch.Tensor, epoch: int, index: int, T: int) -> bool:
        write_atomic(self.path(epoch, index), buf.numpy().data)
        return True


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
