"""A producer's put accounting: one control-plane value that only it writes while alive.

Why one value: TCPStore has no multi-key atomic add, so a put noted in one key and counted
in four counters could be killed between the round trips, leaving the reaper unable to
tell which counts happened. Instead each producer keeps its running totals and the put in
progress in `acct/<client>` and rewrites the whole value with one `set`: every state the
reaper can find is consistent. Global `puts`/`put_bytes` are sums over the producers'
ledgers, and in-flight bytes/records are those sums minus what consumers drained
(`n/drained_*`, acked or discarded records).

The put in progress has a phase:
- `w` (writing): counted, its object may be half-written, no descriptor pushed. A dead
  producer's `w` put is taken back (counts down, object removed, sample re-produced).
- `p` (publishing): the object is whole; its descriptor may or may not have been pushed.
  A dead producer's `p` put is completed (descriptor pushed, claim marked), never re-produced:
  a descriptor pushed twice carries the same put token, and the consumer that loses the
  delivery claim to its twin drops it without touching the counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

WRITING = "w"
PUBLISHING = "p"


@dataclass(frozen=True)
class Ledger:
    puts: int = 0
    put_bytes: int = 0
    phase: str = ""  # "", WRITING or PUBLISHING
    desc: str = ""  # descriptor JSON of the put in progress ("" when none)

    def dumps(self) -> str:
        return json.dumps([self.puts, self.put_bytes, self.phase, self.desc])

    @classmethod
    def loads(cls, raw: str | bytes) -> Ledger:
        puts, put_bytes, phase, desc = json.loads(raw)
        return cls(int(puts), int(put_bytes), str(phase), str(desc))

    def begin(self, desc: str, nbytes: int) -> Ledger:
        """The put of `desc` counted, its object about to be written."""
        return Ledger(self.puts + 1, self.put_bytes + nbytes, WRITING, desc)

    def written(self, desc: str | None = None) -> Ledger:
        """The object whole; `desc` replaces the descriptor begun with (a record packed in
        place is begun before its header exists)."""
        return Ledger(self.puts, self.put_bytes, PUBLISHING, self.desc if desc is None else desc)

    def published(self) -> Ledger:
        return Ledger(self.puts, self.put_bytes)

    def undone(self, nbytes: int) -> Ledger:
        """The put in progress taken back (it failed, or its producer died writing it)."""
        return Ledger(self.puts - 1, self.put_bytes - nbytes)
