"""`make bench`'s producer and transport benches run (quick sizes): they drive the real
serve-target loop through their own sink and the real store client, so a change to either
contract breaks them here rather than in `make bench`. Their figures are not checked."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("bench", "row"),
    [("bench_producer.py", "specctl: hooks, batched (bf16)"), ("bench_transport.py", "specctl")],
)
def test_bench_runs_quick(bench: str, row: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / bench), "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert row in proc.stdout, proc.stdout[-3000:]
