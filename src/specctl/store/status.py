"""`store status` and the live panel of `store up`: one summary dict, rendered two ways.

Read only from the control plane and the master's Prometheus `/metrics`, so status needs
no Mooncake client (no segment, no setup) and works while the store is busy.
"""

from __future__ import annotations

import json
import time
from typing import Any

from specctl.console import err, log
from specctl.store import control as keys
from specctl.store.control import Control
from specctl.store.master import metrics


def collect(ctl: Control, address: str) -> dict[str, Any]:
    """Everything `store status` reports, as plain JSON-able values."""
    meta = {k: ctl.get(keys.meta(k)) for k in ("run", "master", "metrics", "capacity", "pid")}
    counts = ctl.counters()
    roles: dict[str, int] = {}
    leases = 0
    for role, cid in ctl.clients():
        roles[role] = roles.get(role, 0) + 1
        raw = ctl.get(keys.lease(cid))
        leases += len(json.loads(raw)) if raw else 0
    master = metrics(meta["metrics"] or "") if meta["metrics"] else {}
    rates = {
        name: float(ctl.get(f"stats/{name}_per_s") or 0.0)
        for name in ("puts", "put_bytes", "gets", "acks")
    }
    return {
        "address": address,
        "run": meta["run"],
        "master": meta["master"],
        "server_pid": int(meta["pid"] or 0),
        "capacity_bytes": int(meta["capacity"] or 0),
        "inflight_bytes": counts["inflight_bytes"],
        "inflight_records": counts["inflight_records"],
        "queued": ctl.qlen(keys.RECORDS),
        "returned": ctl.qlen(keys.RETURNED),
        "cursor": ctl.cursor()[0],
        "leased": leases,
        "puts": counts["puts"],
        "gets": counts["gets"],
        "acks": counts["acks"],
        "put_bytes": counts["put_bytes"],
        "requeued": counts["requeued"],
        "corrupt": counts["corrupt"],
        "repeats_dropped": counts["repeats"],
        "backpressure_waits": counts["waits"],
        "clients_seen": roles,
        "clients_alive": json.loads(ctl.get("stats/alive") or "{}"),
        "rates_per_s": rates,
        "objects": int(master.get("master_key_count", -1)),
        "segment_allocated_bytes": int(master.get("master_allocated_bytes", -1)),
    }


def table(s: dict[str, Any]) -> Any:
    """A rich Table of a summary."""
    from rich.table import Table

    t = Table(title=f"specctl store {s['address']} (run {s['run']})", show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    cap = s["capacity_bytes"] or 1
    rows = [
        ("records in flight", f"{s['inflight_records']} ({s['queued']} queued)"),
        (
            "bytes in flight",
            f"{_mib(s['inflight_bytes'])} / {_mib(cap)} ({100 * s['inflight_bytes'] / cap:.0f}%)",
        ),
        ("objects in Mooncake", str(s["objects"])),
        ("producers alive / seen", _alive(s, "producer")),
        ("trainers alive / seen", _alive(s, "trainer")),
        ("seqs leased / returned", f"{s['leased']} / {s['returned']} (cursor {s['cursor']})"),
        ("puts / gets / acks", f"{s['puts']} / {s['gets']} / {s['acks']}"),
        (
            "put rate",
            f"{s['rates_per_s']['puts']:.1f} rec/s, "
            f"{s['rates_per_s']['put_bytes'] / 2**20:.1f} MiB/s",
        ),
        (
            "get / ack rate",
            f"{s['rates_per_s']['gets']:.1f} / {s['rates_per_s']['acks']:.1f} rec/s",
        ),
        (
            "requeued / corrupt / repeats",
            f"{s['requeued']} / {s['corrupt']} / {s['repeats_dropped']}",
        ),
        ("back-pressure waits", str(s["backpressure_waits"])),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


def line(s: dict[str, Any]) -> str:
    """One plain log line of a summary (non-TTY panel)."""
    return (
        f"[store] in flight {s['inflight_records']} rec / {_mib(s['inflight_bytes'])}, "
        f"puts {s['puts']} gets {s['gets']} acks {s['acks']}, "
        f"producers {_alive(s, 'producer')}, trainers {_alive(s, 'trainer')}"
    )


def _alive(s: dict[str, Any], role: str) -> str:
    return f"{s['clients_alive'].get(role, 0)} / {s['clients_seen'].get(role, 0)}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class Panel:
    """`store up`'s live status on stderr: a rich table on a TTY, a plain line every 10 s otherwise."""

    def __init__(self) -> None:
        self.live: Any = None
        self.last = 0.0
        self.announced = False

    def tick(self, srv: Any) -> None:
        if not self.announced:
            log(f"store up at {srv.address} (run {srv.run}); export SPECCTL_STORE={srv.address}")
            self.announced = True
        now = time.monotonic()
        if now - self.last < (1.0 if err.is_terminal else 10.0):
            return
        self.last = now
        summary = collect(srv.ctl, srv.address)
        if not err.is_terminal:
            log(line(summary))
            return
        if self.live is None:
            from rich.live import Live

            self.live = Live(table(summary), console=err, auto_refresh=False)
            self.live.__enter__()
        self.live.update(table(summary), refresh=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)
