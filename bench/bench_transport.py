"""Store transport, producer tensors -> trainer tensors, every path measured in one run.

A real store (`specctl store up --detach`: its own process holds the data segment) and, in
this process, a producer client and a trainer client. Each row moves the same synthetic
EAGLE-3 samples (input_ids int32 [T], loss_mask uint8 [T], aux bf16 [T, 3H], last bf16
[T, H]) from producer tensors to trainer tensors: the producer puts n of them, then the
trainer takes all n (rows are timed put phase + get phase, run interleaved, median of
`--reps`). Rows:

- memcpy: numpy copies of the sample's bytes into a pre-faulted arena (the ceiling);
- disk: `torch.save` + `torch.load` of the tensors through /tmp (page cache), file removed;
- raw bytes: Mooncake's copying API, what a naive user calls: tensors -> one `bytes`
  -> `put(key, bytes)`; `get(key) -> bytes` -> tensors (a copy), `batch_remove(force)`;
- raw zero-copy: tensors copied into a registered buffer -> `put_from`; `get_into` a
  registered buffer -> tensor views, `batch_remove(force)` (no control plane, no checks);
- specctl: `pack_record` (native gather + CRC32C) into `Client.buffer(nbytes, sample)`,
  on this host the sample's object in the mapped segment, the objects of a capture batch of
  LEASE records reserved at once (`Client.prepare`, as serve-target does, up to 64 MiB)
  -> `put_record_async` (publishes);
  `next_record` (views of queued records in place, CRC check) -> `ack`: control plane,
  pinning, exactly-once.

Consumers free in groups of GROUP records (a trainer acks a batch after its optimizer
step). Both raw rows use one pair of plain Mooncake clients (`setup`, segment-less, TCP:
what Mooncake's docs set up) of the same master and segment, in this process like the
specctl clients;
specctl's clients map the segment, as on the store's host (`SPECCTL_STORE_SHM=0`: TCP too).
Ratios are within the run; absolute rates depend on the (shared) machine.
`--profile` adds a specctl pass that times every control-plane round trip, Mooncake call,
pack and unpack, and prints where a record's time goes (put-thread rows overlap the others;
"other" is the wall time no row of the calling threads covers).

    .venv/bin/python bench/bench_transport.py [--quick] [--profile] [--reps N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specctl.pack import pack_record, record_nbytes
from specctl.store import Client
from specctl.store import control as keys
from specctl.store.objects import describe, quiet_stderr

MiB = 1 << 20
K = 3
GROUP = 8  # records a trainer holds per optimizer step: acked / removed together
LEASE = 16  # records a producer captures per batch (serve-target: ServeTargetConfig.lease_size)
SHAPES = (576, 4096, 7168)  # SmolLM2-135M, Llama-3-8B, DeepSeek-V3 hidden sizes
Sample = dict[str, torch.Tensor]


def _sample(T: int, H: int) -> Sample:
    g = torch.Generator().manual_seed(H + T)
    return {
        "input_ids": torch.randint(0, 32000, (T,), dtype=torch.int32, generator=g),
        "loss_mask": torch.ones(T, dtype=torch.uint8),
        "aux": torch.randn(T, K * H, generator=g).to(torch.bfloat16),
        "last": torch.randn(T, H, generator=g).to(torch.bfloat16),
    }


def _nbytes(s: Sample) -> int:
    return sum(t.numel() * t.element_size() for t in s.values())


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1).view(torch.uint8).numpy()


Phases = tuple[float, float]  # seconds: put phase, get phase


def _memcpy(s: Sample, n: int) -> Phases:
    """n copies of the sample into distinct places of a pre-faulted arena (so a small sample
    is not copied cache to cache: the store rows write n distinct records too)."""
    src = np.concatenate([_flat(t) for t in s.values()])
    dst = np.ones((n, src.size), dtype=np.uint8)  # written once: pages faulted in
    t0 = time.perf_counter()
    for i in range(n):
        np.copyto(dst[i], src)
    return time.perf_counter() - t0, 0.0


def _disk(s: Sample, n: int, tag: str) -> Phases:
    d = Path(tempfile.mkdtemp(prefix="specctl-bench-disk-"))
    t0 = time.perf_counter()
    for i in range(n):
        torch.save(s, d / f"{tag}-{i}.pt")
    t1 = time.perf_counter()
    for i in range(n):
        path = d / f"{tag}-{i}.pt"
        got = torch.load(path, weights_only=True)
        assert got["aux"].shape == s["aux"].shape
        path.unlink()
    t2 = time.perf_counter()
    d.rmdir()
    return t1 - t0, t2 - t1


def _raw_client(master: str, local_buffer: int) -> Any:
    """A segment-less Mooncake client as a naive user would set one up (plain TCP)."""
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    with quiet_stderr():  # a segment-less client logs "Local segment descriptor not found"
        rc = store.setup("127.0.0.1", "P2PHANDSHAKE", 0, local_buffer, "tcp", "", master)
    assert rc == 0, f"mooncake setup failed [{rc}]"
    return store


def _views(buf: Any, s: Sample) -> Sample:
    """Tensors shaped like s over consecutive bytes of buf (numpy uint8 or bytes)."""
    out, off = {}, 0
    for name, t in s.items():
        nb = t.numel() * t.element_size()
        raw = torch.from_numpy(np.frombuffer(buf, np.uint8, nb, off))
        out[name] = raw.view(t.dtype).view(t.shape)
        off += nb
    return out


def _raw_bytes(prod: Any, cons: Any, s: Sample, n: int, tag: str) -> Phases:
    keys_ = [f"bench/bytes/{tag}/{i}" for i in range(n)]
    t0 = time.perf_counter()
    for k in keys_:
        blob = b"".join(_flat(t).data for t in s.values())  # tensors -> bytes (a copy)
        rc = prod.put(k, blob)
        assert rc == 0, f"put {k}: {describe(rc)}"
    t1 = time.perf_counter()
    with warnings.catch_warnings():  # frombuffer over read-only bytes: we clone at once
        warnings.simplefilter("ignore", UserWarning)
        for i, k in enumerate(keys_):
            data = cons.get(k)
            assert len(data) == _nbytes(s)
            got = {name: t.clone() for name, t in _views(data, s).items()}  # bytes -> tensors
            assert got["aux"].shape == s["aux"].shape
            if (i + 1) % GROUP == 0 or i == n - 1:
                cons.batch_remove(keys_[i - (i % GROUP) : i + 1], True)
    return t1 - t0, time.perf_counter() - t1


def _raw_zero_copy(prod: Any, cons: Any, s: Sample, n: int, tag: str) -> Phases:
    nb = _nbytes(s)
    src, dst = torch.empty(nb, dtype=torch.uint8), torch.empty(nb, dtype=torch.uint8)
    for store, buf in ((prod, src), (cons, dst)):
        assert store.register_buffer(buf.data_ptr(), nb) == 0
    keys_ = [f"bench/zc/{tag}/{i}" for i in range(n)]
    t0 = time.perf_counter()
    for k in keys_:
        flat, off = src.numpy(), 0
        for t in s.values():  # tensors -> registered buffer (the one copy packing also does)
            part = _flat(t)
            flat[off : off + part.size] = part
            off += part.size
        assert prod.put_from(k, src.data_ptr(), nb) == 0
    t1 = time.perf_counter()
    for i, k in enumerate(keys_):
        assert cons.get_into(k, dst.data_ptr(), nb) == nb
        got = _views(dst.numpy(), s)
        assert got["aux"].shape == s["aux"].shape
        if (i + 1) % GROUP == 0 or i == n - 1:
            cons.batch_remove(keys_[i - (i % GROUP) : i + 1], True)
    t2 = time.perf_counter()
    prod.unregister_buffer(src.data_ptr())
    cons.unregister_buffer(dst.data_ptr())
    return t1 - t0, t2 - t1


def _specctl(
    prod: Client, cons: Client, s: Sample, n: int, base: int, pack_s: list[float] | None = None
) -> Phases:
    T, H = s["last"].shape
    nb = record_nbytes(T, H, K, torch.bfloat16)
    t0 = time.perf_counter()
    puts = []
    for i in range(n):  # as serve-target: packed into its object (same host), then published
        if i % LEASE == 0:  # a capture batch: its puts begin at once (up to PREPARE_BYTES)
            prod.prepare([(nb, (0, base + j, T)) for j in range(i, min(i + LEASE, n))])
        out = prod.buffer(nb, (0, base + i, T))  # prepared, or claims, counts, reserves
        tp = time.perf_counter()
        rec = pack_record(epoch=0, index=base + i, input_ids=s["input_ids"],
                          loss_mask=s["loss_mask"], aux_hidden=s["aux"], last_hidden=s["last"],
                          out=out)  # fmt: skip
        if pack_s is not None:
            pack_s.append(time.perf_counter() - tp)
        puts.append(prod.put_record_async(rec, epoch=0, index=base + i, T=T))
    prod.flush()
    t1 = time.perf_counter()
    assert all(p.result() is not None for p in puts)
    held = []
    for i in range(n):  # a trainer holds a batch of records until its optimizer step
        got = cons.next_record(timeout_s=30)
        assert got is not None and got.record.aux_hidden.shape == s["aux"].shape
        held.append(got)
        if len(held) == GROUP or i == n - 1:
            cons.ack(held)
            held = []
    return t1 - t0, time.perf_counter() - t1


# ---------------------------------------------------------------------------- profile


PUT_THREAD = " [put thread]"  # ops of the client's put thread overlap the caller's


class _Timed:
    """Proxy that times every method call of `target` into `book[prefix + name]` (with
    PUT_THREAD appended for calls made on the client's put thread)."""

    def __init__(self, target: Any, prefix: str, book: dict[str, list[float]]) -> None:
        self._target, self._prefix, self._book = target, prefix, book

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._target, name)
        if not callable(fn):
            return fn

        def call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                where = (
                    PUT_THREAD if threading.current_thread().name.startswith("specctl-put") else ""
                )
                self._book[self._prefix + name + where].append(time.perf_counter() - t0)

        return call


def _profile(prod: Client, cons: Client, s: Sample, n: int, base: int) -> list[dict]:
    """One specctl pass with every round trip timed; per-record microseconds by operation."""
    import specctl.pack as pack

    book: dict[str, list[float]] = defaultdict(list)
    saved = [(c, c.ctl.store, c.objects._store) for c in (prod, cons)]
    put_ctl = prod._put_ctl  # the put thread's control-plane connection (None: no transfers)
    unpack = pack.unpack_record

    def timed_unpack(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return unpack(*a, **kw)
        finally:
            book["unpack+crc"].append(time.perf_counter() - t0)

    for c, ctl_store, mc_store in saved:
        side = "producer" if c is prod else "trainer"
        c.ctl.store = _Timed(ctl_store, f"{side} tcpstore.", book)
        c.objects._store = _Timed(mc_store, f"{side} mooncake.", book)
    put_store = put_ctl.store if put_ctl is not None else None
    if put_ctl is not None:
        put_ctl.store = _Timed(put_store, "producer tcpstore.", book)
    pack.unpack_record = timed_unpack
    try:
        put_s, get_s = _specctl(prod, cons, s, n, base, book["producer pack+crc"])
    finally:
        pack.unpack_record = unpack
        if put_ctl is not None:
            put_ctl.store = put_store
        for c, ctl_store, mc_store in saved:
            c.ctl.store, c.objects._store = ctl_store, mc_store
    total = put_s + get_s
    rows = [{"op": op, "calls_per_record": round(len(ts) / n, 2),
             "us_per_record": round(sum(ts) / n * 1e6, 1),
             "share": round(sum(ts) / total, 3)} for op, ts in sorted(book.items())]  # fmt: skip
    timed = sum(sum(ts) for op, ts in book.items() if not op.endswith(PUT_THREAD))
    rows.append({"op": "other (python, polling, waiting for the put thread)", "calls_per_record": 0,
                 "us_per_record": round((total - timed) / n * 1e6, 1),
                 "share": round((total - timed) / total, 3)})  # fmt: skip
    return rows


# ---------------------------------------------------------------------------- main


def _rows(T: int, H: int, nb: int, n: int, times: dict[str, Phases]) -> list[dict]:
    total = {case: sum(p) for case, p in times.items()}
    out = []
    for case, (put_s, get_s) in times.items():
        secs = total[case]
        out.append({"bench": "transport", "H": H, "T": T, "sample_mib": round(nb / MiB, 2),
                    "records": n, "case": case, "records_s": round(n / secs, 1),
                    "gb_s": round(n * nb / secs / 1e9, 3),
                    "put_gb_s": round(n * nb / put_s / 1e9, 3) if put_s else None,
                    "get_gb_s": round(n * nb / get_s / 1e9, 3) if get_s else None,
                    "ratio_vs_memcpy": round(total["memcpy"] / secs, 3),
                    "ratio_vs_raw_bytes": round(total["raw bytes"] / secs, 2),
                    "ratio_vs_raw_zero_copy": round(total["raw zero-copy"] / secs, 2)})  # fmt: skip
    return out


def _measure(clients: tuple, s: Sample, n: int, reps: int, base: int) -> dict[str, Phases]:
    prod, cons, raw_prod, raw_cons = clients
    runs: dict[str, list[Phases]] = defaultdict(list)
    T, H = s["last"].shape
    for r in range(reps):
        tag = f"{H}-{T}-{r}"
        runs["memcpy"].append(_memcpy(s, n))
        runs["disk"].append(_disk(s, n, tag))
        runs["raw bytes"].append(_raw_bytes(raw_prod, raw_cons, s, n, tag))
        runs["raw zero-copy"].append(_raw_zero_copy(raw_prod, raw_cons, s, n, tag))
        runs["specctl"].append(_specctl(prod, cons, s, n, base + r * n))

    def med(ps: list[Phases]) -> Phases:  # the rep with the median total, phases kept together
        return sorted(ps, key=sum)[len(ps) // 2]

    return {case: med(ps) for case, ps in runs.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="T=256 (1-14 MiB samples), 64 MiB")
    ap.add_argument("--profile", action="store_true", help="print where specctl's time goes")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    T, total = (256, 64 * MiB) if args.quick else (1024, 256 * MiB)
    samples = [(H, _sample(T, H)) for H in SHAPES]
    biggest = max(record_nbytes(T, H, K, torch.bfloat16) for H in SHAPES)
    capacity = max(4 * total, 8 * biggest)
    state = Path(tempfile.mkdtemp(prefix="specctl-bench-"))
    up = subprocess.run([sys.executable, "-m", "specctl.cli", "store", "up", "--detach",
                         "--capacity", f"{capacity // MiB}MiB", "--state-dir", str(state)],
                        capture_output=True, text=True, check=True)  # fmt: skip
    address = json.loads(up.stdout)["address"]
    rows: list[dict] = []
    profile: list[dict] = []
    try:
        prod = Client.connect(address, role="producer")
        cons = Client.connect(address, role="trainer")
        master = prod.ctl.get(keys.meta("master")) or ""
        raw_prod = _raw_client(master, 2 * biggest)
        raw_cons = _raw_client(master, 2 * biggest)
        clients = (prod, cons, raw_prod, raw_cons)
        base = 0
        for H, s in samples:
            nb = _nbytes(s)
            n = max(4, total // nb)
            times = _measure(clients, s, n, args.reps, base)
            base += args.reps * n
            rows += _rows(T, H, nb, n, times)
            if args.profile:
                for r in _profile(prod, cons, s, n, base):
                    profile.append({"bench": "transport-profile", "H": H, "T": T, **r})
                base += n
        for c in clients[2:]:
            c.close()
        prod.close()
        cons.close()
    finally:
        subprocess.run([sys.executable, "-m", "specctl.cli", "store", "down", "--store", address,
                        "--state-dir", str(state)], capture_output=True, check=False)  # fmt: skip
    _print(rows, profile)
    return rows + profile


def _print(rows: list[dict], profile: list[dict]) -> None:
    shm = os.environ.get("SPECCTL_STORE_SHM", "1") != "0"
    print(
        f"specctl data path: {'mapped segment' if shm else 'tcp'}; T={rows[0]['T']}; "
        f"acks in groups of {GROUP}"
    )
    print(f"{'H':>5} {'MiB':>6} {'case':<14} {'rec/s':>8} {'GB/s':>7} {'put':>6} {'get':>6} "
          f"{'/memcpy':>8} {'/bytes':>7} {'/zc':>6}")  # fmt: skip
    for r in rows:
        put = f"{r['put_gb_s']:.2f}" if r["put_gb_s"] else "-"
        get = f"{r['get_gb_s']:.2f}" if r["get_gb_s"] else "-"
        print(f"{r['H']:>5} {r['sample_mib']:>6} {r['case']:<14} {r['records_s']:>8} "
              f"{r['gb_s']:>7.3f} {put:>6} {get:>6} {r['ratio_vs_memcpy']:>8.3f} "
              f"{r['ratio_vs_raw_bytes']:>7.2f} {r['ratio_vs_raw_zero_copy']:>6.2f}")  # fmt: skip
    last = None
    for p in profile:
        if p["H"] != last:
            print(f"\nspecctl profile, H={p['H']} T={p['T']} (per record)")
            print(f"  {'operation':<50} {'calls':>6} {'us':>9} {'share':>6}")
            last = p["H"]
        print(
            f"  {p['op']:<50} {p['calls_per_record']:>6} {p['us_per_record']:>9} {p['share']:>6.1%}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
