"""The data segment: one memfd that Mooncake allocates records in and same-host clients map.

The store's segment child (`python -m specctl.store.segment`, spawned by master.py) creates
a memfd of `--capacity` bytes with a random name, mounts it as its Mooncake segment
(`mount_segment` of `/proc/self/fd/N`: Mooncake maps the file shared), and writes where it
lies (`Where`): its pid, the fd, the name, the address Mooncake mapped it at. Mooncake's
master allocates every object in it; remote clients reach it over the transfer engine.

A client on the same host opens `/proc/<pid>/fd/<fd>`, checks it is that memfd (another
pid namespace may have another file there), and maps the same pages (`Mapping`): an
object's replica descriptor names its address in the holder, so `address - base` is its
offset in the client's mapping. A producer writes a record into its object directly and a
trainer reads it in place: no transfer, no holder round trip, no copy beyond packing
(objects.py). The pages belong to the memfd, so records outlive producer and trainer
processes; they are faulted in on first write (no up-front commit of `--capacity`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import mmap
import os
import secrets
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specctl.errors import StoreError
from specctl.paths import write_atomic

NAME = "specctl-segment"


@dataclass(frozen=True)
class Where:
    """Where the segment lies: the holder's pid and fd, Mooncake's base address, its size,
    and the memfd's name (random: the fd a client opens is checked to be this one)."""

    pid: int
    fd: int
    base: int
    size: int
    name: str

    def dumps(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def loads(cls, text: str) -> Where:
        obj = json.loads(text)
        return cls(int(obj["pid"]), int(obj["fd"]), int(obj["base"]), int(obj["size"]),
                   str(obj["name"]))  # fmt: skip


class Mapping:
    """The segment mapped into this process: tensor views of objects by holder address."""

    def __init__(self, where: Where) -> None:
        import torch

        self.where = where
        path = f"/proc/{where.pid}/fd/{where.fd}"
        # another host, user or pid namespace: no such file, no access, or another file
        if not os.readlink(path).startswith(f"/memfd:{where.name} "):
            raise OSError(f"{path} is not the store's segment")
        fd = os.open(path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, where.size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self._all: Any = torch.frombuffer(self._mm, dtype=torch.uint8)

    def view(self, address: int, nbytes: int) -> Any:
        """A uint8 tensor over [address, address + nbytes) of the holder's address space."""
        off = address - self.where.base
        if off < 0 or off + nbytes > self.where.size:  # an object in another segment
            raise StoreError(f"object at {address:#x}+{nbytes} is outside the store's segment")
        return self._all[off : off + nbytes]

    def close(self) -> None:
        """Drop our reference; the pages stay mapped while views of them are alive."""
        self._all = None


def _mapped_base(name: str, size: int) -> int:
    """Where Mooncake mapped our memfd (the one mapping of it, `size` bytes)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        if f"/memfd:{name} " in line:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if hi - lo == size:
                return lo
    raise RuntimeError("Mooncake did not map the segment memfd")


def hold(master: str, host: str, capacity: int, info: Path) -> None:
    """Create and mount the segment, write `info` (a `Where`), serve until SIGTERM."""
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")
    from mooncake.store import MooncakeDistributedStore

    name = f"{NAME}-{secrets.token_hex(8)}"
    fd = os.memfd_create(name)
    os.ftruncate(fd, capacity)
    protocol = os.environ.get("SPECCTL_STORE_PROTOCOL", "tcp")
    device = os.environ.get("SPECCTL_STORE_DEVICE", "")
    store = MooncakeDistributedStore()
    rc = store.setup(host, "P2PHANDSHAKE", 0, 0, protocol, device, master)
    if rc != 0:
        sys.exit(f"segment: Mooncake setup against master {master} failed [{rc}]")
    got = store.mount_segment(f"/proc/self/fd/{fd}", capacity, 0, protocol, "")
    if int(got.get("ret", -1)) != 0:
        sys.exit(f"segment: mounting {capacity} bytes failed: {got}")
    where = Where(os.getpid(), fd, _mapped_base(name, capacity), capacity, name)
    write_atomic(info, where.dumps().encode())  # the store polls for it
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    store.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="The store's data segment (spawned by the store).")
    ap.add_argument("--master", required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--capacity", type=int, required=True)
    ap.add_argument("--info", type=Path, required=True, help="where to write the segment's Where")
    args = ap.parse_args(argv)
    hold(args.master, args.host, args.capacity, args.info)


if __name__ == "__main__":
    main()
