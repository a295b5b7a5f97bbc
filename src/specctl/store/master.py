"""The `mooncake_master` child process: free ports, readiness, dies with its parent.

Facts (shared/reference/sglang-mooncake.md §4): `--rpc_port=0` does *not* pick a free port,
so we pick free ports ourselves; P2PHANDSHAKE metadata (no HTTP metadata server) makes the
master ready in ~0.1 s; readiness = `/health` says `service_ready` *and* the RPC port
accepts a connection; the `mooncake_master` script `execv`s the binary, so the Popen pid
is the master. It runs in its own session (a terminal ^C reaches only us, and we stop it
in order: clients first) with `PR_SET_PDEATHSIG=SIGKILL`, so a SIGKILLed parent leaves
no orphan. The master keeps object metadata in memory only: a restart loses every object.

The data segment lives in a second child, `python -m specctl.store.segment` (same spawn
rules): a memfd mounted into Mooncake, which same-host clients map (segment.py); ready
once it wrote where the segment lies.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from specctl.errors import StoreError
from specctl.store.address import free_port, probe
from specctl.store.segment import Where

PR_SET_PDEATHSIG = 1
LEASE_TTL = "10s"  # we always force-remove, so leases only need to outlive a slow read


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _binary() -> str:
    """mooncake_master beside our interpreter (the venv), else on PATH."""
    local = Path(sys.executable).parent / "mooncake_master"
    found = str(local) if local.exists() else shutil.which("mooncake_master")
    if not found:
        raise StoreError(
            "mooncake_master not found",
            hint="install mooncake-transfer-engine-non-cuda (`make setup`)",
        )
    return found


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Own session (a terminal ^C reaches only us), dies with us (PDEATHSIG), logs to a file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


@dataclass
class Master:
    proc: subprocess.Popen[bytes]
    host: str
    rpc_port: int
    metrics_port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.rpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}"

    def stop(self, timeout_s: float = 5.0) -> None:
        _stop(self.proc, timeout_s)


def _stop(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start(host: str, log_path: Path, timeout_s: float = 20.0) -> Master:
    """Spawn mooncake_master on free ports of `host`; return once it serves."""
    rpc, metrics = free_port(host), free_port(host)
    args = [
        _binary(),
        f"--rpc_port={rpc}",
        f"--rpc_address={host}",
        f"--metrics_port={metrics}",
        f"--metrics_host={host}",
        f"--default_kv_lease_ttl={LEASE_TTL}",
        "--enable_metric_reporting=false",
        "--rpc_thread_num=4",
        "--put_start_discard_timeout_sec=5",
        "--put_start_release_timeout_sec=10",
    ]
    proc = _spawn(args, log_path)
    master = Master(proc, host, rpc, metrics, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StoreError(
                f"mooncake_master exited with rc {proc.returncode}", hint=f"see {log_path}"
            )
        if _ready(master):
            return master
        time.sleep(0.05)
    master.stop()
    raise StoreError(f"mooncake_master not ready after {timeout_s:.0f}s", hint=f"see {log_path}")


@dataclass
class SegmentHolder:
    """The segment child (segment.py): holds the data segment in a memfd that same-host
    clients map; remote ones reach it over the transfer engine."""

    proc: subprocess.Popen[bytes]
    where: Where
    log_path: Path

    def stop(self, timeout_s: float = 5.0) -> None:
        _stop(self.proc, timeout_s)


def start_segment(
    host: str, master: str, capacity: int, log_path: Path, timeout_s: float = 20.0
) -> SegmentHolder:
    """Spawn the segment child with a `capacity`-byte segment; return once it is mounted."""
    info = log_path.with_suffix(".json")
    info.unlink(missing_ok=True)
    args = [sys.executable, "-m", "specctl.store.segment", f"--master={master}",
            f"--host={host}", f"--capacity={capacity}", f"--info={info}"]  # fmt: skip
    proc = _spawn(args, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StoreError(
                f"the data segment child exited with rc {proc.returncode}", hint=f"see {log_path}"
            )
        if info.exists():
            where = Where.loads(info.read_text())
            info.unlink()
            return SegmentHolder(proc, where, log_path)
        time.sleep(0.05)
    _stop(proc, 5.0)
    raise StoreError(f"the data segment not ready after {timeout_s:.0f}s", hint=f"see {log_path}")


def _ready(master: Master) -> bool:
    try:
        with urllib.request.urlopen(master.metrics_url + "/health", timeout=1) as r:
            ok = bool(json.loads(r.read()).get("service_ready"))
    except (OSError, ValueError):
        return False
    return ok and probe(master.host, master.rpc_port, 0.1)


def metrics(url: str, timeout_s: float = 2.0) -> dict[str, float]:
    """The master's Prometheus gauges without labels (master_key_count, ...); {} if down."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=timeout_s) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or "{" in line:
            continue
        name, _, value = line.partition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
