"""Producer / consumer processes for the store integration tests (run as scripts).

Records are deterministic functions of their seq (as real ones are of the sample id), so
the consumer can check content, not only CRCs. Sizes are mixed: ~4 KiB to ~1 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from specctl.pack import pack_record, record_nbytes
from specctl.store import Client
from specctl.store.master import pid_alive

H, K = 64, 3


def tokens(seq: int) -> int:
    """Mixed sizes: T in [8, 2000) -> records of ~4 KiB to ~1 MiB (bf16, H=64, k=3)."""
    return 8 + (seq * 7919) % 1992


def make_record(
    client: Client | None, seq: int, num_prompts: int, placed: bool = False
) -> tuple[torch.Tensor, int, int, int]:
    """Pack seq's record into `client.buffer` (`placed`: the sample's object itself)."""
    epoch, index = divmod(seq, num_prompts)
    T = tokens(seq)
    g = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, 50_000, (T,), generator=g, dtype=torch.int32)
    mask = (torch.arange(T) % 3 != 0).to(torch.uint8)
    aux = torch.randn(T, K * H, generator=g)
    last = torch.randn(T, H, generator=g)
    nbytes = record_nbytes(T, H, K, torch.bfloat16)
    sample = (epoch, index, T) if placed else None
    out = client.buffer(nbytes, sample) if client is not None else None
    rec = pack_record(
        epoch=epoch,
        index=index,
        input_ids=ids,
        loss_mask=mask,
        aux_hidden=aux,
        last_hidden=last,
        out=out,
    )
    return rec, epoch, index, T


def prepared(client: Client, seqs: list[int], num_prompts: int) -> int:
    """`client.prepare` the puts of seqs, as serve-target does for a capture batch."""
    records = []
    for seq in seqs:
        epoch, index = divmod(seq, num_prompts)
        records.append(
            (record_nbytes(tokens(seq), H, K, torch.bfloat16), (epoch, index, tokens(seq)))
        )
    return client.prepare(records)


def check_record(record, seq: int) -> None:
    """The received views equal what the producer packed for this seq."""
    T = tokens(seq)
    g = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, 50_000, (T,), generator=g, dtype=torch.int32)
    assert record.input_ids.shape == (T,) and torch.equal(record.input_ids, ids), seq
    aux = torch.randn(T, K * H, generator=g)
    assert torch.equal(record.aux_hidden[0], aux[0].to(torch.bfloat16)), seq


class _DieAfter:
    """Control-plane proxy that SIGKILLs this process after its n-th call inside a put: a
    real kill at an exact point of `put_record`, cleanup handlers and all skipped."""

    def __init__(self, store: object, n: int) -> None:
        self._store, self.n, self.armed = store, n, False

    def __getattr__(self, name: str) -> object:
        fn = getattr(self._store, name)

        def call(*a: object, **kw: object) -> object:
            if self.armed and self.n == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            out = fn(*a, **kw)
            if self.armed:
                self.n -= 1
                if self.n == 0:
                    os.kill(os.getpid(), signal.SIGKILL)
            return out

        return call


def produce(args: argparse.Namespace) -> dict:
    client = Client.connect(args.store, role="producer")
    client.run_meta("num_prompts", str(args.num_prompts))
    if args.die_after is not None:
        proxy = _DieAfter(client.ctl.store, args.die_after)
        client.ctl.store = proxy  # type: ignore[assignment]
        put, buffer = client.put_record, client.buffer

        def put_then_die(*a: object, **kw: object) -> object:
            if not proxy.armed:  # armed by `buffer` already when it began the put
                proxy.armed, proxy.n = True, args.die_after
            if put(*a, **kw) is None:  # type: ignore[arg-type]
                proxy.armed = False  # lost the claim (a seq the store published): next one
                return None
            raise SystemExit(f"--die-after {args.die_after}: the put made fewer calls")

        def buffer_then_die(*a: object, **kw: object) -> object:
            proxy.armed, proxy.n = True, args.die_after
            return buffer(*a, **kw)  # type: ignore[arg-type]

        client.put_record = put_then_die  # type: ignore[method-assign]
        if args.prepare:  # the batch's puts begin in `prepare`: claims, ledger, room, objects
            prepare = client.prepare

            def prepare_then_die(*a: object, **kw: object) -> object:
                proxy.armed, proxy.n = True, args.die_after
                return prepare(*a, **kw)  # type: ignore[arg-type]

            client.prepare = prepare_then_die  # type: ignore[method-assign]
        elif args.placed:  # the put begins in `buffer`: claim, ledger, room, object
            client.buffer = buffer_then_die  # type: ignore[method-assign]
    published, skipped = [], []
    while (lease := client.lease_prompts(args.batch, limit=args.limit)) is not None:
        if args.prepare:
            prepared(client, lease.seqs, args.num_prompts)
        for seq in lease.seqs:
            if args.delay:  # "inference time", while the seq is leased
                time.sleep(args.delay)
            placed = args.placed or args.prepare
            rec, epoch, index, T = make_record(client, seq, args.num_prompts, placed)
            if seq in args.corrupt:
                args.corrupt.remove(seq)  # corrupt it once: the re-produced one is clean
                rec[-1] ^= 0xFF if rec[-1] != 0 else 0x01  # last_hidden's last byte
                rec[rec.numel() // 2] ^= 0x5A
            desc = client.put_record(rec, epoch=epoch, index=index, T=T)
            (published if desc is not None else skipped).append(seq)
            lease.done(seq)
    stats = client.stats()
    client.close()
    return {"published": published, "skipped": skipped, "waits": stats["waits"]}


def consume(args: argparse.Namespace) -> dict:
    client = Client.connect(args.store, role="trainer")
    num_prompts = int(args.num_prompts)
    seen: list[int] = []
    if args.start_after:
        time.sleep(args.start_after)
    while len(seen) < args.limit:
        got = client.next_record(timeout_s=args.idle_timeout)
        if got is None:
            break
        d = got.descriptor
        seq = d.epoch * num_prompts + d.index
        check_record(got.record, seq)
        seen.append(seq)
        client.ack([got])
    # a repeat (a producer killed between publishing and marking it) is dropped, not delivered
    extra = client.next_record(timeout_s=1.0)
    assert extra is None, extra.descriptor
    client.close()
    return {"seqs": seen}


@contextmanager
def running_store(state_dir: Path, *flags: str) -> Iterator[dict]:
    """`store up --detach` ... `store down`; asserts the down leaves no process behind."""
    from tests.conftest import run_cli

    proc = run_cli("store", "up", "--detach", "--state-dir", str(state_dir), *flags, check=True)
    state = json.loads(proc.stdout)
    try:
        yield state
    finally:
        down = run_cli("store", "down", "--store", state["address"], "--state-dir", str(state_dir))
        assert down.returncode == 0, down.stderr
        assert json.loads(down.stdout)["forced"] == []
        assert not any(pid_alive(state[k]) for k in ("pid", "master_pid", "segment_pid"))
        assert not list(state_dir.glob("store-*.json"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["producer", "consumer"])
    p.add_argument("--store", required=True)
    p.add_argument("--limit", type=int, required=True)
    p.add_argument("--num-prompts", type=int, default=400)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--corrupt", type=int, nargs="*", default=[])
    p.add_argument("--start-after", type=float, default=0.0)
    p.add_argument("--idle-timeout", type=float, default=30.0)
    p.add_argument("--placed", action="store_true", help="pack into the sample's object")
    p.add_argument("--prepare", action="store_true", help="begin each lease's puts at once")
    p.add_argument("--die-after", type=int, help="SIGKILL itself after the n-th control-plane "
                   "call of its first put (0: before any)")  # fmt: skip
    args = p.parse_args()
    result = produce(args) if args.role == "producer" else consume(args)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
