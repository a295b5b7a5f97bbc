"""`store up --detach` and `store down`: a server in the background, found again by address.

Detaching runs the ordinary foreground server in a new session (`python -m specctl.cli
store up ...`, stdout to /dev/null, stderr to a log in the state dir) and waits for its
state file, so the detached and foreground paths are the same code. `down` asks the server
to stop through the control plane (`ctl/shutdown`) and waits for its pid and the master's
pid to be gone; SIGTERM/SIGKILL are the fallback for a wedged server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from specctl.errors import StoreError, StoreUnavailable, UsageError
from specctl.store import control as keys
from specctl.store.address import parse, probe
from specctl.store.master import pid_alive
from specctl.store.server import read_states


def spawn(args: list[str], state_dir: Path, timeout_s: float = 60.0) -> dict[str, Any]:
    """Start `specctl store up <args>` detached; return its state once it serves."""
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / f"server-{os.getpid()}-{int(time.time())}.log"
    cmd = [sys.executable, "-m", "specctl.cli", "store", "up", *args, "--state-dir", str(state_dir)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for state in read_states(state_dir):
            if int(state["pid"]) == proc.pid:
                state["log"] = str(log_path)
                return state
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise StoreError(
                f"store server exited with rc {proc.returncode}: {tail[0]}",
                hint=f"full log: {log_path}",
            )
        time.sleep(0.05)
    proc.kill()
    raise StoreError(f"store server not ready after {timeout_s:.0f}s", hint=f"see {log_path}")


def resolve(address: str | None, state_dir: Path) -> tuple[str, dict[str, Any] | None]:
    """The store to act on: --store/SPECCTL_STORE, else the one state file in state_dir."""
    if address is not None or os.environ.get("SPECCTL_STORE"):
        addr = str(parse(address))
        match = [s for s in read_states(state_dir) if s["address"] == addr]
        return addr, (match[0] if match else None)
    states = read_states(state_dir)
    if not states:
        raise StoreUnavailable(
            f"no store running from {state_dir}",
            hint="pass --store HOST:PORT or start one with `specctl store up`",
        )
    if len(states) > 1:
        raise UsageError(
            f"{len(states)} stores running from {state_dir}: "
            + ", ".join(s["address"] for s in states),
            hint="pick one with --store",
        )
    return states[0]["address"], states[0]


def stop(address: str, timeout_s: float = 20.0) -> dict[str, Any]:
    """Ask the server at address to shut down; wait until it and its master are gone."""
    from specctl.store.control import Control

    addr = parse(address)
    if not probe(addr.host, addr.port, 2.0):
        raise StoreUnavailable(f"no store answers at {addr}", hint="nothing to stop")
    ctl = Control.connect(addr.host, addr.port, 5.0)
    pids = [int(ctl.get(keys.meta(k)) or 0) for k in ("pid", "master_pid", "segment_pid")]
    ctl.set(keys.SHUTDOWN, "1")
    del ctl
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (
        probe(addr.host, addr.port, 0.0) or any(p and pid_alive(p) for p in pids)
    ):
        time.sleep(0.1)
    forced = []
    for pid in pids:
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            forced.append(pid)
    return {"stopped": str(addr), "pids": [p for p in pids if p], "forced": forced}


def state_summary(state: dict[str, Any]) -> dict[str, Any]:
    return {
        k: state[k]
        for k in ("address", "pid", "master", "master_pid", "segment_pid", "run", "capacity", "log")
        if k in state
    }


def dumps(state: dict[str, Any]) -> str:
    return json.dumps(state, sort_keys=True)
