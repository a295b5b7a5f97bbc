"""`specctl store up`: the Mooncake master child, the control plane, the segment, a supervisor.

One process hosts everything a store is:
1. a `mooncake_master` child (master.py): object metadata;
2. the control plane, a `torch.distributed.TCPStore` master on the one published port;
3. a segment child holding the `--capacity` data segment (segment.py), so records survive
   producer or trainer death; clients on this host map it (a producer writes each record
   into its object, a trainer reads it in place), others use Mooncake's transfer engine;
4. a supervisor loop (supervisor.py): reaps the leases and half-done puts of producers
   whose heartbeat stopped, publishes rates; the loop exits when `store down` sets the
   shutdown key.

Shutdown order matters: our own Mooncake client closes, then the segment child, then the
master (Mooncake clients hang on a dead master). The master runs with PDEATHSIG, so even a SIGKILLed server
leaves no orphan. A state file `<state_dir>/store-<port>.json` (pid, address) lets
`store down` find a detached server.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specctl.console import log
from specctl.errors import InputError, StoreError, UsageError
from specctl.store import control as keys
from specctl.store import master as mc
from specctl.store.address import bind_listener, is_loopback
from specctl.store.control import Control
from specctl.store.supervisor import Supervisor

HIGH_WM, LOW_WM = 0.8, 0.5  # back-pressure watermarks as fractions of capacity
MIN_CAPACITY = 16 << 20  # Mooncake refuses smaller segments (setup -600)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    capacity: int = 4 << 30
    lease_ttl_s: float = 5.0
    state_dir: Path = field(default_factory=lambda: default_state_dir())
    allow_remote: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be 0-65535, got {self.port}")
        if self.lease_ttl_s <= 0:
            raise UsageError(f"--lease-ttl must be positive, got {self.lease_ttl_s}")
        for parent in (self.state_dir, *self.state_dir.parents):
            if parent.exists():
                if not parent.is_dir():
                    raise InputError(f"--state-dir {self.state_dir}: {parent} is not a directory")
                break


def default_state_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "specctl" if runtime else Path.home() / ".cache" / "specctl"
    return base / "store"


class Server:
    """The running store. `start()` then `tick()` in a loop, `stop()` in a finally."""

    def __init__(self, cfg: ServerConfig) -> None:
        if not is_loopback(cfg.host) and not cfg.allow_remote:
            raise UsageError(
                f"--host {cfg.host} is not a loopback address",
                hint="pass --allow-remote to serve other machines",
            )
        if cfg.capacity < MIN_CAPACITY:
            raise UsageError(
                f"--capacity {cfg.capacity} bytes is below Mooncake's minimum segment",
                hint="use at least 16MiB",
            )
        if cfg.lease_ttl_s <= 0:
            raise UsageError(f"--lease-ttl must be positive, got {cfg.lease_ttl_s}")
        self.cfg = cfg
        self.listener = bind_listener(cfg.host, cfg.port)
        self.port = int(self.listener.getsockname()[1])
        self.advertise = _advertised_host(cfg.host)
        self.address = f"{self.advertise}:{self.port}"
        self.run = "r" + secrets.token_hex(4)
        self.master: mc.Master | None = None
        self.segment: mc.SegmentHolder | None = None
        self.objects: Any = None
        self.ctl: Control | None = None
        self.supervisor = Supervisor(cfg.lease_ttl_s, self.run)
        self.state_path = cfg.state_dir / f"store-{self.port}.json"

    def start(self) -> None:
        from specctl.store.objects import Objects

        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        log = self.cfg.state_dir / f"master-{self.port}.log"
        mhost = self.cfg.host if self.cfg.host != "0.0.0.0" else self.advertise
        self.master = mc.start(mhost, log)
        self.ctl = Control.host(self.listener)
        seg_log = self.cfg.state_dir / f"segment-{self.port}.log"
        self.segment = mc.start_segment(mhost, self.master.address, self.cfg.capacity, seg_log)
        self.objects = objects = Objects(self.master.address)  # removes only: no mapping
        self.supervisor.remove = objects.try_remove
        facts = {
            "master": self.master.address,
            "metrics": self.master.metrics_url,
            "segment": self.segment.where.dumps(),
            "segment_pid": self.segment.proc.pid,
            "run": self.run,
            "capacity": self.cfg.capacity,
            "high_wm": int(self.cfg.capacity * HIGH_WM),
            "low_wm": int(self.cfg.capacity * LOW_WM),
            "lease_ttl_s": self.cfg.lease_ttl_s,
            "pid": os.getpid(),
            "master_pid": self.master.proc.pid,
        }
        for k, v in facts.items():
            self.ctl.set(keys.meta(k), str(v))
        self.ctl.init_counters()
        self.ctl.set(keys.meta("ready"), "1")
        self._write_state()

    def _write_state(self) -> None:
        assert self.master is not None
        state = {
            "pid": os.getpid(),
            "address": self.address,
            "run": self.run,
            "master": self.master.address,
            "master_pid": self.master.proc.pid,
            "segment_pid": self.segment.proc.pid if self.segment else 0,
            "metrics": self.master.metrics_url,
            "capacity": self.cfg.capacity,
            "master_log": str(self.master.log_path),
        }
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_path)

    def tick(self) -> bool:
        """One supervisor pass; False once `store down` asked us to stop."""
        assert self.ctl is not None
        try:
            self.supervisor.tick(self.ctl)
        except StoreError as e:  # the store keeps serving; the next tick tries again
            log(f"[store] supervisor: {e}")
        return self.ctl.get(keys.SHUTDOWN) is None

    def stop(self) -> None:
        t0 = time.monotonic()
        if self.objects is not None:
            self.objects.close()
            self.objects = None
        if self.segment is not None:
            self.segment.stop()
        t1 = time.monotonic()
        if self.master is not None:
            self.master.stop()
        log(
            f"store stopped: segment closed in {t1 - t0:.1f}s, master in {time.monotonic() - t1:.1f}s"
        )
        self.state_path.unlink(missing_ok=True)
        self.ctl = None  # the TCPStore server stops with its last reference
        self.listener.close()  # no-op once TCPStore took the fd


def serve(
    cfg: ServerConfig, on_tick: Callable[[Server], None] | None = None, every_s: float = 0.25
) -> Server:
    """Run a store in this process until `store down` (or a signal raises out of the loop)."""
    server = Server(cfg)
    try:
        server.start()
        while server.tick():
            if on_tick is not None:
                on_tick(server)
            time.sleep(every_s)
    finally:
        server.stop()
    return server


def _advertised_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostbyname(socket.gethostname())
    return host


def read_states(state_dir: Path) -> list[dict[str, Any]]:
    """State files of stores started from this state dir whose server is still alive."""
    out = []
    for path in sorted(state_dir.glob("store-*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if mc.pid_alive(int(state["pid"])):
            state["path"] = str(path)
            out.append(state)
        else:
            path.unlink(missing_ok=True)
    return out
