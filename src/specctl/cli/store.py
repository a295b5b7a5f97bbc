"""`specctl store up|status|down`: run, inspect and stop the store (see specctl.store)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from specctl.cli.options import StoreOpt

command = typer.Typer(no_args_is_help=True, add_completion=False)

StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="Where state files live (default: $XDG_RUNTIME_DIR/specctl/store "
        "or ~/.cache/specctl/store).",
    ),
]


@command.command()
def up(
    host: Annotated[
        str, typer.Option(help="Interface to bind (loopback unless --allow-remote).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Control-plane port (0: a free one).")] = 0,
    capacity: Annotated[
        str, typer.Option(help="Memory for in-flight records, e.g. 4GiB.")
    ] = "4GiB",
    detach: Annotated[
        bool, typer.Option("--detach", help="Run in the background; print the address and return.")
    ] = False,
    allow_remote: Annotated[
        bool, typer.Option("--allow-remote", help="Allow a non-loopback --host.")
    ] = False,
    lease_ttl: Annotated[
        float,
        typer.Option(
            help="Seconds without heartbeat before a producer's lease returns to the pool."
        ),
    ] = 5.0,
    state_dir: StateDirOpt = None,
) -> None:
    """Start mooncake_master, the control plane and the data segment; print the address.

    Example: `export SPECCTL_STORE=$(specctl store up --detach | jq -r .address)`
    """
    from specctl.config import parse_size
    from specctl.console import emit_summary, log
    from specctl.store import daemon, server

    cfg = server.ServerConfig(
        host=host,
        port=port,
        capacity=parse_size(capacity),
        lease_ttl_s=lease_ttl,
        allow_remote=allow_remote,
        state_dir=state_dir or server.default_state_dir(),
    )
    if detach:
        server.Server(cfg).listener.close()  # validate host/port here: errors stay one line
        args = [
            "--host",
            host,
            "--port",
            str(port),
            "--capacity",
            capacity,
            "--lease-ttl",
            str(lease_ttl),
        ]
        state = daemon.spawn(args + (["--allow-remote"] if allow_remote else []), cfg.state_dir)
        log(
            f"store up at {state['address']} (pid {state['pid']}); stop it with `specctl store down`"
        )
        emit_summary(daemon.state_summary(state))
        return
    from specctl.store.status import Panel

    panel = Panel()
    try:
        srv = server.serve(cfg, on_tick=panel.tick)
    finally:
        panel.close()
    emit_summary({"address": srv.address, "run": srv.run, "stopped": True})


@command.command()
def status(store: StoreOpt = None, state_dir: StateDirOpt = None) -> None:
    """Records and bytes in flight, producers and trainers seen, put/get rates (JSON + table).

    Example: `specctl store status --store 127.0.0.1:29500`
    """
    from specctl.console import emit_summary, err
    from specctl.store import daemon, server
    from specctl.store import status as st
    from specctl.store.address import parse, require
    from specctl.store.control import Control

    address, _ = daemon.resolve(store, state_dir or server.default_state_dir())
    addr = parse(address)
    require(addr.host, addr.port, 3.0, "specctl store")
    summary = st.collect(Control.connect(addr.host, addr.port, 5.0), address)
    err.print(st.table(summary))
    emit_summary(summary)


@command.command()
def down(store: StoreOpt = None, state_dir: StateDirOpt = None) -> None:
    """Stop the store cleanly (master, control plane, segment); no orphan processes.

    Example: `specctl store down` (the one store started from this machine's state dir)
    """
    from specctl.console import emit_summary, log
    from specctl.store import daemon, server

    address, _ = daemon.resolve(store, state_dir or server.default_state_dir())
    result = daemon.stop(address)
    log(f"store at {address} stopped")
    emit_summary(result)
