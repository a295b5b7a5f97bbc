"""The store server's supervisor: heartbeats, reaping dead producers, rates for `status`.

A heartbeat is a counter each client bumps; we time its changes with our own clock, so
clients' clocks do not matter. A producer silent for `lease_ttl_s` is declared dead and:
1. the puts in progress in its ledger (ledger.py) are settled: one still being written (or
   prepared, not yet written) is taken back (counts down, object force-removed); one whose
   object was whole is published (descriptor pushed, claim marked), as the producer would
   have;
2. its publication claims on its leased seqs that are not marked published are dropped;
3. its lease (`lease/<id>`, the seqs it had not finished) goes back to `q/returned`.
Each step reads and writes whole values, so a kill at any point of a put leaves the counts
exact (tests/integration/test_store_e2e.py kills a producer at every point of a put).
If it was only slow and publishes after all, the consumers' delivery claim
(`got/<epoch>/<index>`) still hands each sample out once.

Mooncake trap: a put interrupted by the producer's death can leave its object half-written:
`remove` and `get_into` answer -703 (replica not ready) until the master discards it
(`--put_start_discard_timeout_sec`, set short in master.py). Such a seq is held back here
(in the dead producer's lease key, so other producers wait for it) and returned to the pool
once the object could be removed, so the dead put's leftovers are always freed. (Object
keys are unique per put, so a re-production could not collide with them anyway.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from specctl.protocol import Descriptor
from specctl.store import control as keys
from specctl.store.control import Control
from specctl.store.ledger import PUBLISHING
from specctl.store.objects import NOT_FOUND


@dataclass
class _Seen:
    role: str
    beat: int = -1
    at: float = 0.0
    alive: bool = True


class Supervisor:
    def __init__(
        self, ttl_s: float, run: str = "", remove: Callable[[str], int] | None = None
    ) -> None:
        self.ttl_s = ttl_s
        self.run = run
        self.remove = remove  # force-remove a Mooncake object -> rc (the server's client)
        self.seen: dict[str, _Seen] = {}
        self.held: dict[str, tuple[str, int]] = {}  # half-written key -> (producer, seq)
        self._last: tuple[float, dict[str, int]] | None = None

    def tick(self, ctl: Control) -> None:
        now = time.monotonic()
        for role, cid in ctl.clients():
            s = self.seen.setdefault(cid, _Seen(role, at=now))
            beat = ctl.add(keys.hb(cid), 0)
            if beat != s.beat:
                s.beat, s.at, s.alive = beat, now, True
            elif s.alive and (now - s.at > self.ttl_s or ctl.get(keys.left(cid))):
                s.alive = False
                self._reap(ctl, cid)
        self._release_held(ctl)
        self._rates(ctl, now)

    def _reap(self, ctl: Control, cid: str) -> None:
        prompts = int(ctl.get("run/num_prompts") or 0)
        stuck = self._settle_puts(ctl, cid)
        raw = ctl.get(keys.lease(cid))
        seqs: list[int] = json.loads(raw) if raw else []
        back = []
        for seq in seqs if prompts else []:
            epoch, index = divmod(seq, prompts)
            claim = ctl.get(keys.pub(epoch, index)) or ""
            if claim.startswith(cid + "/") and not claim.endswith(keys.PUBLISHED):
                ctl.delete(keys.pub(epoch, index))
            if (epoch, index) in stuck:
                self.held[stuck[(epoch, index)]] = (cid, seq)
            else:
                back.append(seq)
        ctl.push_seqs(back if prompts else seqs)
        self._write_lease(ctl, cid)
        ctl.count("requeued", len(seqs))

    def _settle_puts(self, ctl: Control, cid: str) -> dict[tuple[int, int], str]:
        """Finish or take back a dead producer's puts in progress, one ledger write each;
        returns the sample ids and object keys of those half-written (held until they can
        be removed)."""
        stuck: dict[tuple[int, int], str] = {}
        ledger = ctl.ledger(cid)
        for row in ledger.open:
            desc = Descriptor.from_json(row.desc)
            pub = keys.pub(desc.epoch, desc.index)
            ours = ctl.get(pub) == desc.put  # not marked published; still this put's to settle
            if row.phase == PUBLISHING and ours:
                ctl.push(keys.RECORDS, row.desc)  # perhaps again: consumers drop the twin
                ledger = ledger.published(row.put)
                ctl.set_many({pub: desc.put + keys.PUBLISHED, keys.acct(cid): ledger.dumps()})
                continue
            if ours:
                rc = self.remove(desc.key) if self.remove else 0
                if rc not in (0, NOT_FOUND):
                    stuck[(desc.epoch, desc.index)] = desc.key
            ledger = ledger.undone([row.put])
            ctl.set(keys.acct(cid), ledger.dumps())
        return stuck

    def _release_held(self, ctl: Control) -> None:
        for key, (cid, seq) in list(self.held.items()):
            if self.remove is None or self.remove(key) in (0, NOT_FOUND):
                del self.held[key]
                ctl.push_seqs([seq])
                self._write_lease(ctl, cid)

    def _write_lease(self, ctl: Control, cid: str) -> None:
        """A dead producer's lease keeps only its held seqs, so other producers wait for them."""
        held = [seq for c, seq in self.held.values() if c == cid]
        if held:
            ctl.set(keys.lease(cid), json.dumps(held))
        else:
            ctl.delete(keys.lease(cid))

    def _rates(self, ctl: Control, now: float) -> None:
        counts = ctl.counters()
        if self._last is None:
            self._last = (now, counts)
            for name in ("puts", "put_bytes", "gets", "acks"):
                ctl.set(f"stats/{name}_per_s", "0")
        elif now - self._last[0] >= 1.0:
            t0, c0 = self._last
            for name in ("puts", "put_bytes", "gets", "acks"):
                ctl.set(f"stats/{name}_per_s", f"{(counts[name] - c0[name]) / (now - t0):.3f}")
            self._last = (now, counts)
        alive: dict[str, int] = {}
        for s in self.seen.values():
            alive[s.role] = alive.get(s.role, 0) + int(s.alive)
        ctl.set("stats/alive", json.dumps(alive))
        ctl.set("stats/held", str(len(self.held)))
