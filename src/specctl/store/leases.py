"""Prompt leases: which producer is producing which sample, and exactly-once publication.

A sample's `seq` comes from a cursor (moved by compare-and-set, n fresh seqs at a time);
seqs handed back (a dead producer's unfinished lease, a corrupt record, a trainer resume)
wait in `q/returned`, which `lease_prompts` drains first. Each producer keeps one key,
`lease/<client>`, listing the seqs it holds and has not finished; the server's supervisor
pushes that list back to the pool when the producer's heartbeat stops.

A re-issued seq may still be in flight at its first producer (it was slow, not dead), so
publication is claimed with `compare_set(pub/<epoch>/<index>, "", producer)` before the
put: the second producer loses the claim and skips. The claim is marked once the
descriptor is pushed; when the supervisor reaps a dead producer it drops that producer's
unmarked claims on the reaped seqs (it died between claim and publication). If it was only
slow and publishes after all, or died between push and mark, the consumers' delivery
claim (`got/<epoch>/<index>`) still hands the sample out once.

Fresh seqs are written to the lease key before the cursor moves (compare-and-set), so a
crash never loses them. Known window: a seq popped from `q/returned` by a producer that
is SIGKILLed before its next control-plane write (one round trip) is lost; that needs
two crashes in a row.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import TYPE_CHECKING

from specctl.store import control as keys

if TYPE_CHECKING:
    from specctl.store.control import Control

_moves = itertools.count()


class Lease:
    """Seqs leased to one producer. `done(seq)` after publishing; `release()` hands back the rest."""

    def __init__(self, book: LeaseBook, seqs: list[int]) -> None:
        self._book = book
        self.seqs = seqs

    def done(self, seq: int) -> None:
        self._book.finish([seq])

    def release(self) -> None:
        """Return every seq of this lease not yet done to the pool."""
        self._book.give_back(self.seqs)


class LeaseBook:
    """One client's outstanding seqs, mirrored to `lease/<client>` on every change."""

    def __init__(self, ctl: Control, client_id: str) -> None:
        self.ctl = ctl
        self.client_id = client_id
        self.outstanding: set[int] = set()

    def take(self, n: int, limit: int | None, poll_s: float = 0.1) -> list[int]:
        """Up to n seqs: returned ones first, then fresh ones below limit.

        Empty only when nothing is left below limit and no other live producer still holds
        seqs that could come back; while one does, wait for it to finish or be reaped.
        """
        while True:
            seqs = self._returned(n, limit)
            if len(seqs) < n:
                seqs += self._fresh(n - len(seqs), limit)
            if seqs:
                self.outstanding.update(seqs)
                self._save()
                return seqs
            if not self._others_outstanding():
                return []
            time.sleep(poll_s)

    def _fresh(self, k: int, limit: int | None) -> list[int]:
        """k fresh seqs from the cursor, written to our lease key *before* the cursor moves.

        Compare-and-set instead of `add`: if we die between the two steps, the reaper hands
        back seqs we never got (wasted work, the publication claim keeps them single),
        never seqs nobody holds.
        """
        while True:
            start, raw = self.ctl.cursor()
            end = start + k if limit is None else min(start + k, limit)
            if start >= end:
                return []
            seqs = list(range(start, end))
            self.outstanding.update(seqs)
            self._save()
            if self.ctl.move_cursor(raw, end, f"{self.client_id}/{next(_moves)}"):
                return seqs
            self.outstanding.difference_update(seqs)  # another producer moved it first
            self._save()

    def _returned(self, n: int, limit: int | None) -> list[int]:
        seqs: list[int] = []
        while len(seqs) < n and (item := self.ctl.pop(keys.RETURNED)) is not None:
            seq = int(item)
            if limit is None or seq < limit:
                seqs.append(seq)
        return seqs

    def _others_outstanding(self) -> bool:
        for role, cid in self.ctl.clients():
            if role == "producer" and cid != self.client_id:
                raw = self.ctl.get(keys.lease(cid))
                if raw and json.loads(raw):
                    return True
        return self.ctl.qlen(keys.RETURNED) > 0

    def finish(self, seqs: list[int]) -> None:
        self.outstanding.difference_update(seqs)
        self._save()

    def give_back(self, seqs: list[int]) -> None:
        back = [s for s in seqs if s in self.outstanding]
        self.ctl.push_seqs(back)
        self.finish(back)

    def release_all(self) -> None:
        self.give_back(sorted(self.outstanding))

    def _save(self) -> None:
        if self.outstanding:
            self.ctl.set(keys.lease(self.client_id), json.dumps(sorted(self.outstanding)))
        else:
            self.ctl.delete(keys.lease(self.client_id))
