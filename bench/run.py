"""`make bench`: run every benchmark entry and print one table of same-run ratios.

Each `bench/bench_*.py` exposes `main(argv) -> list[dict]`; rows carry a `bench` name,
the measured figures and a `ratio` against the baseline measured in the same run
(memcpy, the plain-torch path, a naive trainer). Absolute times are printed for context
only: machines of this kind differ, so compare ratios.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["bench_pack", "bench_transport", "bench_producer", "bench_train", "bench_decode"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--only", nargs="*", help="run only these entries (e.g. bench_pack)")
    ap.add_argument("--out", default="runs/bench.json", help="where to write all rows as JSON")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    results: dict[str, list[dict]] = {}
    for name in ORDER:
        if args.only and name not in args.only:
            continue
        if not (HERE / f"{name}.py").exists():
            continue
        mod = importlib.import_module(name)
        t0 = time.monotonic()
        print(f"\n== {name} ==", flush=True)
        rows = mod.main(["--quick"] if args.quick else [])
        results[name] = rows
        print(f"({name}: {time.monotonic() - t0:.0f}s)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nall rows written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
