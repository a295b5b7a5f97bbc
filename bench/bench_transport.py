"""Store transport: specctl put_record / next_record+ack vs raw Mooncake vs memcpy, one run.

A real store (`specctl store up --detach`, its own process holding the segment) and two
clients in this process: a producer puts N packed records, then a trainer gets, verifies
(CRC32C) and acks them, so each direction is one TCP hop, measured separately. Baselines
from the same run: raw Mooncake `put_from` / `get_into` of the same bytes (the transport
without specctl's control plane, pinning and checks) and a plain memcpy (numpy `copyto`
into a pre-faulted buffer). Compare ratios, never absolute rates across machines.

    .venv/bin/python bench/bench_transport.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from specctl.pack import pack_record, record_nbytes
from specctl.store import Client
from specctl.store.objects import Objects

MiB = 1 << 20
H, K = 1024, 3


def _record(client: Client, seq: int, mib: int) -> tuple[torch.Tensor, int]:
    T = max(1, mib * MiB // ((K + 1) * H * 2))
    aux = torch.randn(T, K * H).to(torch.bfloat16)
    last = torch.randn(T, H).to(torch.bfloat16)
    out = client.buffer(record_nbytes(T, H, K, torch.bfloat16))
    rec = pack_record(epoch=0, index=seq, input_ids=torch.arange(T, dtype=torch.int32),
                      loss_mask=torch.ones(T, dtype=torch.uint8), aux_hidden=aux,
                      last_hidden=last, out=out)  # fmt: skip
    return rec, T


def _specctl(prod: Client, cons: Client, mib: int, n: int, base: int) -> tuple[float, float]:
    """Seconds to put n records, then to get + verify + ack them."""
    put_s = 0.0
    for i in range(n):
        rec, T = _record(prod, base + i, mib)
        t0 = time.perf_counter()
        assert prod.put_record(rec, epoch=0, index=base + i, T=T) is not None
        put_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n):
        got = cons.next_record(timeout_s=30)
        assert got is not None
        cons.ack([got])
    return put_s, time.perf_counter() - t0


def _raw(
    objs: Objects, src: torch.Tensor, dst: torch.Tensor, n: int, tag: str
) -> tuple[float, float]:
    keys = [f"bench/{tag}/{i}" for i in range(n)]
    t0 = time.perf_counter()
    for k in keys:
        objs.put(k, src.data_ptr(), src.numel())
    put_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k in keys:
        assert objs.get_into(k, dst.data_ptr(), dst.numel()) == src.numel()
        objs.remove(k)
    return put_s, time.perf_counter() - t0


def _memcpy(nbytes: int, n: int) -> float:
    a = np.ones(nbytes, dtype=np.uint8)
    b = np.zeros(nbytes, dtype=np.uint8)
    np.copyto(b, a)  # fault the destination's pages in first: memcpy into warm memory
    t0 = time.perf_counter()
    for _ in range(n):
        np.copyto(b, a)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    sizes, total, reps = ([1, 16], 64, 1) if args.quick else ([1, 16, 64], 256, 3)
    state = Path(tempfile.mkdtemp(prefix="specctl-bench-"))
    up = subprocess.run([sys.executable, "-m", "specctl.cli", "store", "up", "--detach",
                         "--capacity", f"{2 * total}MiB", "--state-dir", str(state)],
                        capture_output=True, text=True, check=True)  # fmt: skip
    address = json.loads(up.stdout)["address"]
    rows: list[dict] = []
    try:
        prod = Client.connect(address, role="producer")
        cons = Client.connect(address, role="trainer")
        raw = prod.objects  # a segment-less Mooncake client: same hop as put_record
        base = 0
        for mib in sizes:
            n = max(2, total // mib)
            src, dst = prod.slots.new(mib * MiB).tensor, cons.slots.new(mib * MiB).tensor
            src.fill_(7)
            runs = []
            for r in range(reps):
                runs.append((_memcpy(mib * MiB, n), *_raw(raw, src, dst, n, f"{mib}-{r}"),
                             *_specctl(prod, cons, mib, n, base)))  # fmt: skip
                base += n
            memcpy, raw_put, raw_get, put, get = (
                statistics.median(c) for c in zip(*runs, strict=True)
            )
            mb = n * mib
            for case, secs, ref in (("raw put_from", raw_put, raw_put),
                                    ("raw get_into", raw_get, raw_get),
                                    ("put_record", put, raw_put),
                                    ("next_record+ack", get, raw_get)):  # fmt: skip
                rows.append({"bench": "transport", "size_mib": mib, "case": case,
                             "mib_s": round(mb / secs, 1), "ratio_vs_memcpy": round(memcpy / secs, 3),
                             "ratio_vs_raw": round(ref / secs, 3)})  # fmt: skip
        prod.close()
        cons.close()
    finally:
        subprocess.run([sys.executable, "-m", "specctl.cli", "store", "down", "--store", address,
                        "--state-dir", str(state)], capture_output=True, check=False)  # fmt: skip
    print(f"{'size':>6} {'case':<16} {'MiB/s':>8} {'vs memcpy':>10} {'vs raw':>8}")
    for r in rows:
        print(
            f"{r['size_mib']:>4}Mi {r['case']:<16} {r['mib_s']:>8} {r['ratio_vs_memcpy']:>10} "
            f"{r['ratio_vs_raw']:>8}"
        )
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
