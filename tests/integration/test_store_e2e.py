"""`specctl store` end to end: real mooncake_master, real processes, no mocks.

Each test runs its own store (`store up --detach`), because one store serves one run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from specctl.pack import record_nbytes
from specctl.store.control import Control
from tests.conftest import REPO, run_cli
from tests.integration.store_worker import H, K, running_store, tokens

pytestmark = pytest.mark.integration
WORKER = [sys.executable, str(Path(__file__).with_name("store_worker.py"))]


def worker(role: str, store: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*WORKER, role, "--store", store, *args],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def status(store: str) -> dict:
    return json.loads(run_cli("store", "status", "--store", store, check=True).stdout)


def assert_drained(s: dict, n: int) -> None:
    """Nothing left in flight, and the counts exact (even after a producer was killed -9)."""
    assert (s["queued"], s["objects"]) == (0, 0)
    assert (s["inflight_records"], s["inflight_bytes"]) == (0, 0), s
    assert s["gets"] == s["acks"] == n


def test_two_producers_one_consumer_exactly_once(tmp_path: Path) -> None:
    n = 1000
    with running_store(tmp_path, "--capacity", "256MiB") as st:
        store = st["address"]
        producers = [worker("producer", store, "--limit", str(n)) for _ in range(2)]
        consumer = worker("consumer", store, "--limit", str(n))
        got = finish(consumer)["seqs"]  # content and CRC checked in the consumer
        p1, p2 = (finish(p) for p in producers)
        assert sorted(got) == list(range(n))  # every record once
        assert sorted(p1["published"] + p2["published"]) == list(range(n))
        assert p1["published"] and p2["published"] and not p1["skipped"] + p2["skipped"]
        s = status(store)
        assert_drained(s, n)
        assert s["puts"] == n and s["cursor"] >= n
        assert s["put_bytes"] > 100 * 2**20  # mixed sizes up to ~1 MiB
        assert s["clients_seen"] == {"producer": 2, "trainer": 1}


def test_killed_producer_loses_and_repeats_nothing(tmp_path: Path) -> None:
    n = 300
    with running_store(tmp_path, "--capacity", "256MiB", "--lease-ttl", "1") as st:
        store = st["address"]
        victim = worker("producer", store, "--limit", str(n), "--delay", "0.03")
        survivor = worker("producer", store, "--limit", str(n), "--delay", "0.03")
        consumer = worker("consumer", store, "--limit", str(n))
        host, port = store.rsplit(":", 1)
        ctl = Control.connect(host, int(port), timeout_s=10)  # polls faster than the CLI
        deadline = time.monotonic() + 60
        while ctl.counters()["puts"] < 40:
            assert time.monotonic() < deadline and victim.poll() is None
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        got = finish(consumer)["seqs"]
        survived = finish(survivor)
        assert Counter(got) == Counter(range(n))  # exactly once, despite the kill
        s = status(store)
        assert_drained(s, n)
        # claims kept re-issued seqs from being put twice; a put the victim died in was
        # taken back or published for it by the store, never put again
        assert s["puts"] == n and s["repeats_dropped"] <= 1
        assert s["requeued"] >= 1 and survived["published"], (s, len(survived["published"]))


@pytest.mark.parametrize(
    ("mode", "batch", "points"),
    [("copied", 1, 8), ("placed", 1, 8), ("prepare", 3, 9)],
    ids=["copied", "packed-in-place", "prepared-batch"],
)
def test_a_kill_at_any_point_of_a_put_leaves_exact_counts(
    tmp_path: Path, mode: str, batch: int, points: int
) -> None:
    """SIGKILL a producer before its put and after each control-plane call of it in turn
    (claim, ledger, in-flight read, object written, ledger, push, mark); the store settles
    each dead put and every sample is delivered once, with every count exact. `placed`: the
    put begins in `buffer(nbytes, sample)` and the record is packed into its object;
    `prepare`: the puts of a lease of three begin at once (three claims, one ledger write,
    their objects reserved), then the first is packed in place and published."""
    n = points + 2
    flags = {"copied": [], "placed": ["--placed"], "prepare": ["--prepare"]}[mode]
    with running_store(tmp_path, "--capacity", "64MiB", "--lease-ttl", "1") as st:
        store = st["address"]
        for k in range(points + 1):
            victim = worker("producer", store, "--limit", str(n), "--batch", str(batch),
                            "--die-after", str(k), *flags)  # fmt: skip
            _, err = victim.communicate(timeout=120)
            if k < points:
                assert victim.returncode == -signal.SIGKILL, (k, err[-2000:])
            else:  # one call past the last: the put completes without dying
                assert victim.returncode == 1 and "made fewer calls" in err, err[-2000:]
        survivor = worker("producer", store, "--limit", str(n))
        got = finish(worker("consumer", store, "--limit", str(n)))["seqs"]
        finish(survivor)
        assert Counter(got) == Counter(range(n))
        s = status(store)
        assert_drained(s, n)
        # kills after the object was whole were published by the store, not re-produced:
        # one put per sample; the kill between push and mark left one twin descriptor
        sizes = sum(record_nbytes(tokens(seq), H, K, torch.bfloat16) for seq in range(n))
        assert (s["puts"], s["put_bytes"], s["repeats_dropped"]) == (n, sizes, 1)
        assert s["requeued"] >= points


def test_full_store_makes_producers_wait_not_drop(tmp_path: Path) -> None:
    n = 80  # ~40 MiB of records into a 16 MiB store (Mooncake's smallest segment)
    with running_store(tmp_path, "--capacity", "16MiB") as st:
        store = st["address"]
        producer = worker("producer", store, "--limit", str(n))
        consumer = worker("consumer", store, "--limit", str(n), "--start-after", "3")
        got = finish(consumer)["seqs"]
        prod = finish(producer)
        assert sorted(got) == list(range(n))
        assert prod["waits"] > 0  # back-pressure happened
        assert_drained(status(store), n)


def test_status_and_down_errors(tmp_path: Path) -> None:
    for args in (["status", "--store", "nonsense"], ["down", "--store", "host:99999"]):
        proc = run_cli("store", *args, "--state-dir", str(tmp_path))
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.startswith("Error:") and proc.stderr.count("\n") == 1
    t0 = time.monotonic()
    proc = run_cli("store", "status", "--store", f"127.0.0.1:{_free()}")
    assert proc.returncode == 1 and "no specctl store answers" in proc.stderr
    assert time.monotonic() - t0 < 15
    proc = run_cli("store", "down", "--state-dir", str(tmp_path), env={"SPECCTL_STORE": ""})
    assert proc.returncode == 1 and "no store running" in proc.stderr


def test_up_refuses_a_taken_port_and_a_remote_host(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_cli("store", "up", "--port", str(port), "--state-dir", str(tmp_path))
        assert proc.returncode == 2 and f"cannot bind 127.0.0.1:{port}" in proc.stderr
        assert "Traceback" not in proc.stderr
    proc = run_cli("store", "up", "--host", "0.0.0.0", "--detach", "--state-dir", str(tmp_path))
    assert proc.returncode == 2 and "--allow-remote" in proc.stderr
    assert not any(tmp_path.glob("store-*.json"))
    proc = run_cli("store", "up", "--capacity", "1MiB", "--state-dir", str(tmp_path))
    assert proc.returncode == 2 and "minimum segment" in proc.stderr


def _free() -> int:
    from specctl.store.address import free_port

    return free_port()


def test_client_connect_fails_fast_without_store() -> None:
    from specctl.errors import StoreUnavailable, UsageError
    from specctl.store import Client

    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable):
        Client.connect(f"127.0.0.1:{_free()}", timeout_s=2.0)
    assert time.monotonic() - t0 < 6  # not Mooncake's ~90 s setup hang
    with pytest.raises(UsageError, match="malformed"):
        Client.connect("127.0.0.1", timeout_s=2.0)
    os.environ.pop("SPECCTL_STORE", None)


def _foreground(state_dir: Path) -> tuple[subprocess.Popen[str], dict]:
    from tests.conftest import SPECCTL

    proc = subprocess.Popen([*SPECCTL, "store", "up", "--capacity", "16MiB", "--state-dir",
                             str(state_dir)], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (files := list(state_dir.glob("store-*.json"))):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    return proc, json.loads(files[0].read_text())


def _gone(pid: int, within_s: float = 15) -> bool:
    from specctl.store.master import pid_alive

    deadline = time.monotonic() + within_s
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_foreground_server_leaves_no_orphans_on_signals(tmp_path: Path) -> None:
    # SIGTERM: clean stop (exit 128+15), state file removed, master stopped
    proc, state = _foreground(tmp_path / "term")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert _gone(state["master_pid"]) and _gone(state["segment_pid"])
    assert not list((tmp_path / "term").glob("store-*.json"))
    # SIGKILL: no cleanup code runs; PR_SET_PDEATHSIG still takes the master down
    proc, state = _foreground(tmp_path / "kill")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert _gone(state["master_pid"]) and _gone(state["segment_pid"])
