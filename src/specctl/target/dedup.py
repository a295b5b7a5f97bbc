"""Drop samples whose token sequence (prompt + answer) was already produced in this run.

Greedy regeneration of a repeated prompt, a small source upsampled by its weight, or a
self-prompt the target writes twice all give byte-identical samples; training on them again
only over-fits. Which samples are checked is `samples.deduplicated` (config `dedup`): by
default what sampling wrote; fixed data and greedy answers repeat on purpose. A dropped
sample id is never published: the trainer neither trains nor holds it out. Each sample's ids are hashed (blake2b-128 of the int32 ids and the mask) and
claimed run-wide: in the store with `compare_set(dup/<hash>, "", "<epoch>/<index>")` (one
control-plane round trip; the claim holds the sample id, so a re-issued lease re-making the
same sample still wins its own claim), in `--to-dir` mode in a per-producer set. The first
sample id to claim a hash is published; which of two duplicate ids that is depends on
timing, the set of published samples does not. A `--to-dir` rerun starts a fresh set.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable

from specctl.target.template import Tokenized

Claim = Callable[[str, str], str]  # (key, value) -> the value stored (ours if we won)


def sample_hash(t: Tokenized) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(array("i", t.input_ids).tobytes())
    h.update(bytes(t.loss_mask))
    return h.hexdigest()


class Dedup:
    """First claim of a hash wins; `claim` is the store's compare-and-set (None: local only).

    With a store claim the local dict is only a cache of it, so it is cleared past
    CACHE_MAX entries (an endless producer's memory stays flat); without one it is the truth.
    """

    CACHE_MAX = 200_000

    def __init__(self, claim: Claim | None = None) -> None:
        self.claim = claim
        self.seen: dict[str, str] = {}
        self.dropped = 0

    def keep(self, t: Tokenized, epoch: int, index: int) -> bool:
        key, sid = sample_hash(t), f"{epoch}/{index}"
        owner = self.seen.get(key)
        if owner is None:
            if self.claim is not None and len(self.seen) >= self.CACHE_MAX:
                self.seen.clear()
            owner = self.claim(f"dup/{key}", sid) if self.claim is not None else sid
            self.seen[key] = owner
        if owner != sid:
            self.dropped += 1
            return False
        return True
