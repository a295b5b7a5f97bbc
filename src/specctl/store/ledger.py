"""A producer's put accounting: one control-plane value that only it writes while alive.

Why one value: TCPStore has no multi-key atomic add, so a put noted in one key and counted
in four counters could be killed between the round trips, leaving the reaper unable to
tell which counts happened. Instead each producer keeps its running totals and its puts in
progress in `acct/<client>` and rewrites the whole value with one `set`: every state the
reaper can find is consistent. Global `puts`/`put_bytes` are sums over the producers'
ledgers, and in-flight bytes/records are those sums minus what consumers drained
(`n/drained_*`, acked or discarded records).

Usually one put is in progress; a producer that `prepare`s a batch (its objects reserved
in one round trip) has one per prepared sample. Each has a phase:
- `w` (writing): counted, its object may be half-written or still empty, no descriptor
  pushed. A dead producer's `w` put is taken back (counts down, object removed, sample
  re-produced).
- `p` (publishing): the object is whole; its descriptor may or may not have been pushed.
  A dead producer's `p` put is completed (descriptor pushed, claim marked), never re-produced:
  a descriptor pushed twice carries the same put token, and the consumer that loses the
  delivery claim to its twin drops it without touching the counts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

WRITING = "w"
PUBLISHING = "p"


@dataclass(frozen=True)
class Open:
    """A put in progress: its phase, put token, size and descriptor JSON."""

    phase: str
    put: str
    nbytes: int
    desc: str


@dataclass(frozen=True)
class Ledger:
    puts: int = 0
    put_bytes: int = 0
    open: tuple[Open, ...] = ()  # the puts in progress, oldest first

    def dumps(self) -> str:
        return json.dumps(
            [self.puts, self.put_bytes, [[o.phase, o.put, o.nbytes, o.desc] for o in self.open]]
        )

    @classmethod
    def loads(cls, raw: str | bytes) -> Ledger:
        puts, put_bytes, rows = json.loads(raw)
        rows = tuple(Open(str(a), str(b), int(c), str(d)) for a, b, c, d in rows)
        return cls(int(puts), int(put_bytes), rows)

    def begin(self, puts: Iterable[tuple[str, int, str]]) -> Ledger:
        """Puts (token, nbytes, descriptor JSON) counted, their objects about to be written."""
        new = tuple(Open(WRITING, put, nbytes, desc) for put, nbytes, desc in puts)
        return Ledger(
            self.puts + len(new), self.put_bytes + sum(o.nbytes for o in new), self.open + new
        )

    def written(self, put: str, desc: str | None = None) -> Ledger:
        """The object of `put` whole; `desc` replaces the descriptor begun with (a record
        packed in place is begun before its header exists)."""
        rows = tuple(
            Open(PUBLISHING, put, o.nbytes, o.desc if desc is None else desc) if o.put == put else o
            for o in self.open
        )
        return Ledger(self.puts, self.put_bytes, rows)

    def published(self, put: str) -> Ledger:
        return Ledger(self.puts, self.put_bytes, tuple(o for o in self.open if o.put != put))

    def undone(self, puts: Iterable[str]) -> Ledger:
        """Puts in progress taken back (failed, not used, or their producer died writing)."""
        gone = set(puts)
        drop = [o for o in self.open if o.put in gone]
        return Ledger(
            self.puts - len(drop),
            self.put_bytes - sum(o.nbytes for o in drop),
            tuple(o for o in self.open if o.put not in gone),
        )
