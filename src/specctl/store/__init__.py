"""The store: Mooncake data plane + TCPStore control plane (`specctl store up`), and its client.

Modules: address (the one HOST:PORT), master (mooncake_master child), server (what
`store up` runs), supervisor (heartbeats, reaping dead producers), daemon (`--detach`,
`down`), status, control (control-plane keys), ledger (a producer's put accounting),
objects (Mooncake wrapper, error codes), slots (registered buffers), leases (prompt leases,
exactly-once), client (`Client`).
Importing this package imports neither torch nor mooncake; they load on first use.
"""

from specctl.store.client import Client, Received
from specctl.store.leases import Lease

__all__ = ["Client", "Lease", "Received"]
