"""Store addresses: one `HOST:PORT` (the control plane's TCP port) names a whole store.

Every other fact (Mooncake master, metrics port, run name, watermarks) is published as a
key in the control plane, so commands need only this one string (`--store` or
`SPECCTL_STORE`). Reachability is checked with a plain socket before any torch or Mooncake
client is built: both retry for a long time against a dead port (TCPStore until its
timeout, Mooncake `setup()` ~90 s), and we want a one-line error within seconds.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from dataclasses import dataclass

from specctl.errors import StoreUnavailable, UsageError

ENV_VAR = "SPECCTL_STORE"


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse(text: str | None) -> Address:
    """`HOST:PORT` -> Address; None falls back to $SPECCTL_STORE. Malformed -> UsageError."""
    if text is None:
        text = os.environ.get(ENV_VAR) or None
    if text is None:
        raise UsageError(
            "no store address",
            hint=f"pass --store HOST:PORT or set {ENV_VAR}; `specctl store up` prints it",
        )
    host, sep, port_s = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise UsageError(
            f"malformed store address {text!r}", hint="expected HOST:PORT, e.g. 127.0.0.1:29600"
        )
    return Address(host, int(port_s))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def probe(host: str, port: int, timeout_s: float) -> bool:
    """True if something accepts a TCP connection at host:port within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(1.0, timeout_s))):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


def require(host: str, port: int, timeout_s: float, what: str) -> None:
    """probe() or raise StoreUnavailable naming what is missing."""
    if not probe(host, port, timeout_s):
        raise StoreUnavailable(
            f"no {what} answers at {host}:{port} (waited {timeout_s:.0f}s)",
            hint="start one with `specctl store up` or check --store / SPECCTL_STORE",
        )


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (small race until the caller binds it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0 = any free port); UsageError if the port is taken.

    The control plane is handed this socket (TCPStore `master_listen_fd`), so it binds only
    the interface we chose instead of TCPStore's default wildcard.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise UsageError(
            f"cannot bind {host}:{port}: {e.strerror}", hint="pick another --port"
        ) from None
    s.listen(512)
    return s
