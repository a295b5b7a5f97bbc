"""Prompt sources mixed by weight into one prompt space: sample index -> (source, prompt).

`--data chatterbot:3,self:2,chats.jsonl:1` names sources with weights: built-ins
(`chatterbot`, `mtbench`), files or saved-dataset folders, and `self` (the target writes
the user turn, one fresh prompt per sample id). An epoch has `size` slots; every slot is a
sample index, and `pick(seed, epoch, index)` is a pure function, so sample ids stay
deterministic and the store's leases and exactly-once claims work unchanged.

Two modes:
- *concat* (no weight given, the legacy form `--data X --self-prompts N`): the sources one
  after the other, items in file order, self-prompts last; slot i is item i.
- *weighted*: the epoch is long enough to cover the finite source with the largest
  size/weight once (smaller-weighted ones are upsampled); each source gets its exact share
  of slots (largest remainder) and a seeded permutation (Feistel, per epoch) interleaves
  them, so any prefix of an epoch is mixed at the weights. A finite source's k-th slot
  walks a seeded shuffle of its items, a fresh shuffle each full cycle, so items repeat only
  after all others were used.
MT-Bench is the evaluation set (`eval-accept --data mtbench`): mixing it into training
inflates measured acceptance, so it is never a default and using it logs a warning.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from specctl.console import log
from specctl.errors import UsageError
from specctl.target.data import Prompt

SELF = "self"
EVAL_ONLY = ("mtbench",)


@dataclass
class DataMix:
    """YAML form: `data: {sources: [chatterbot:3, self:2]}` (a string or a plain list works too)."""

    sources: list[str] = field(default_factory=list)


@dataclass
class Source:
    name: str
    weight: float | None  # None: not given (concat mode)
    prompts: list[Prompt] | None = None  # None: self-prompts (unbounded)
    slots: int = 0  # slots per epoch


@dataclass
class Pick:
    source: str
    prompt: Prompt | None  # None: a self-prompt


def parse_specs(data: str | list[str] | DataMix | None) -> list[tuple[str, float | None]]:
    """'a:3,b,c:0.5' (or a list of such items) -> [(name, weight or None)]."""
    if data is None:
        return []
    items = data.sources if isinstance(data, DataMix) else data
    if isinstance(items, str):
        items = [s for s in items.split(",")]
    out: list[tuple[str, float | None]] = []
    for raw in items:
        name, weight = _split_weight(str(raw).strip())
        if not name:
            raise UsageError(f"--data has an empty source in {data!r}")
        if name.lower() != "none":
            out.append((name, weight))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise UsageError(f"--data names a source twice: {', '.join(names)}")
    return out


def _split_weight(item: str) -> tuple[str, float | None]:
    name, sep, tail = item.rpartition(":")
    if not sep:
        return item, None
    try:
        weight = float(tail)
    except ValueError:
        return item, None  # a path with a colon
    if not weight > 0 or math.isinf(weight):
        raise UsageError(f"--data weight of {name!r} must be a positive number, got {tail!r}")
    return name, weight


class PromptSpace:
    """The run's prompt space (see module docstring); `size` is `num_prompts` of the run."""

    def __init__(self, sources: list[Source], self_count: int) -> None:
        if not sources:
            raise UsageError("no prompts: give --data or --self-prompts N")
        self.sources = sources
        self.weighted = any(s.weight is not None for s in sources)
        _assign_slots(sources, self_count, self.weighted)
        self.starts = [0]
        for s in sources:
            self.starts.append(self.starts[-1] + s.slots)
        self.size = self.starts[-1]

    @classmethod
    def from_prompts(cls, prompts: list[Prompt], self_prompts: int) -> PromptSpace:
        """Legacy layout: the prompts in order, then `self_prompts` self-prompts."""
        srcs = [Source("data", None, prompts)] if prompts else []
        if self_prompts > 0:
            srcs.append(Source(SELF, None))
        return cls(srcs, self_prompts)

    def pick(self, seed: int, epoch: int, index: int) -> Pick:
        if not 0 <= index < self.size:
            raise IndexError(f"sample index {index} outside the prompt space of {self.size}")
        # 1. slot -> (source, k-th slot of that source in this epoch)
        j = permute(index, self.size, (seed, "mix", epoch)) if self.weighted else index
        s = bisect.bisect_right(self.starts, j) - 1
        src, k = self.sources[s], j - self.starts[s]
        if src.prompts is None:
            return Pick(src.name, None)
        # 2. k -> item: identity in concat mode, else a fresh shuffle per cycle of the source
        if not self.weighted:
            return Pick(src.name, src.prompts[k % len(src.prompts)])
        cycle, pos = divmod(epoch * src.slots + k, len(src.prompts))
        return Pick(src.name, src.prompts[permute(pos, len(src.prompts), (seed, s, cycle))])

    def describe(self) -> str:
        parts = [
            f"{s.name}{'' if s.weight is None else f':{s.weight:g}'} "
            f"({'self' if s.prompts is None else len(s.prompts)} prompts, {s.slots} slots)"
            for s in self.sources
        ]
        return f"{'weighted' if self.weighted else 'concat'} mix of " + ", ".join(parts)


def _assign_slots(sources: list[Source], self_count: int, weighted: bool) -> None:
    if not weighted:  # concat: every item once, self-prompts last
        for s in sources:
            s.slots = len(s.prompts) if s.prompts is not None else self_count
            if s.slots <= 0:
                raise UsageError(
                    "`self` without a weight needs --self-prompts N (self-prompts per epoch)"
                )
        return
    weights = [s.weight if s.weight is not None else 1.0 for s in sources]
    total = sum(weights)
    sizes = [
        (len(s.prompts) if s.prompts is not None else self_count, w)
        for s, w in zip(sources, weights, strict=True)
    ]
    epoch = max((math.ceil(n * total / w) for n, w in sizes if n > 0), default=0)
    if epoch <= 0:
        raise UsageError("only self-prompts: give --self-prompts N (self-prompts per epoch)")
    # largest remainder: exact integer shares that sum to the epoch
    exact = [epoch * w / total for w in weights]
    slots = [math.floor(x) for x in exact]
    by_rest = sorted(range(len(exact)), key=lambda i: (slots[i] - exact[i], i))
    for i in by_rest[: epoch - sum(slots)]:
        slots[i] += 1
    for s, n in zip(sources, slots, strict=True):
        s.slots = n


def _hash(*parts: Any) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def permute(x: int, n: int, key: Any) -> int:
    """A keyed bijection of range(n), evaluated pointwise (4-round Feistel + cycle walking)."""
    if n <= 1:
        return 0
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    while True:
        left, right = x >> half, x & mask
        for r in range(4):
            left, right = right, left ^ (_hash(key, r, right) & mask)
        x = (left << half) | right
        if x < n:  # the domain is < 4n, so this takes < 4 walks on average
            return x


def build_space(
    data: str | list[str] | DataMix | None, self_prompts: int, regenerate: bool
) -> PromptSpace:
    """Load every source and lay out the prompt space; warns when MT-Bench is trained on."""
    from specctl.target.data import load_prompts

    specs = parse_specs(data)
    if self_prompts > 0 and SELF not in [n for n, _ in specs]:
        specs.append((SELF, None))  # legacy `--self-prompts N`: N self-prompts per epoch
    sources = []
    for name, weight in specs:
        if name in EVAL_ONLY:
            log(
                f"warning: training on {name!r}, the evaluation set: eval-accept on it will "
                "over-state acceptance; evaluate on prompts you did not train on"
            )
        prompts = None if name == SELF else load_prompts(name, regenerate)
        sources.append(Source(name, weight, prompts))
    return PromptSpace(sources, self_prompts)
