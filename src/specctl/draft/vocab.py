"""Draft vocabulary: the `draft_vocab_size` most frequent target tokens under the loss mask.

Which tokens and how many: the counts should be the target's own outputs over a *diverse*
prompt set (train-draft's `--vocab-from`), not only the training answers (a vocab built from
narrow chatterbot answers covered 86% of MT-Bench's target tokens). The size is a speed
trade-off (`choose_vocab_size`): every token outside the draft vocab is a certain rejection,
while every draft-vocab row costs LM-head time on each draft step, which the head dominates.

`d2t` [Vd] int64 holds offsets (target id = draft id + d2t[draft id], the SGLang / vLLM /
SpecForge convention); `t2d` [V] bool marks target ids that are in the draft vocab. Draft ids
are the kept target ids in increasing order. The mapping is computed once (rank 0), saved as
safetensors, and every rank loads the same file, so producers and trainers cannot diverge.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from specctl.errors import InputError


@dataclass
class VocabMapping:
    d2t: torch.Tensor  # [Vd] int64 offsets
    t2d: torch.Tensor  # [V] bool
    counts: torch.Tensor  # [V] int64 token counts it was built from
    info: dict[str, Any] = field(default_factory=dict)  # how it was chosen (not saved)

    @property
    def draft_vocab_size(self) -> int:
        return int(self.d2t.numel())

    @property
    def vocab_size(self) -> int:
        return int(self.t2d.numel())

    def target_ids(self) -> torch.Tensor:
        return torch.arange(self.draft_vocab_size) + self.d2t

    def coverage(self) -> float:
        """Fraction of the counted tokens the draft vocab can emit."""
        total = int(self.counts.sum())
        return float(self.counts[self.t2d].sum()) / total if total else 0.0

    def save(self, path: Path | str) -> None:
        from safetensors.torch import save_file

        save_file(
            {
                "d2t": self.d2t.contiguous(),
                "t2d": self.t2d.contiguous(),
                "counts": self.counts.contiguous(),
            },
            str(path),
            metadata={
                "vocab_size": str(self.vocab_size),
                "draft_vocab_size": str(self.draft_vocab_size),
            },
        )

    @classmethod
    def load(
        cls, path: Path | str, vocab_size: int | None = None, draft_vocab_size: int | None = None
    ) -> VocabMapping:
        from safetensors.torch import load_file

        try:
            t = load_file(str(path))
            m = cls(t["d2t"].long(), t["t2d"].bool(), t["counts"].long())
        except (OSError, KeyError, RuntimeError) as e:
            raise InputError(
                f"cannot read vocab mapping {path}: {str(e).splitlines()[0]}"
            ) from None
        if vocab_size is not None and m.vocab_size != vocab_size:
            raise InputError(
                f"vocab mapping {path} is for a {m.vocab_size}-token target, "
                f"this target has {vocab_size}"
            )
        if draft_vocab_size is not None and m.draft_vocab_size != draft_vocab_size:
            raise InputError(
                f"vocab mapping {path} has {m.draft_vocab_size} draft tokens, "
                f"--draft-vocab-size asks for {draft_vocab_size}"
            )
        return m


def count_tokens(
    samples: Iterable[tuple[torch.Tensor, torch.Tensor]], vocab_size: int
) -> torch.Tensor:
    """(input_ids [T], loss_mask [T]) pairs -> counts [V] of ids under the mask."""
    return count_tokens_split(samples, vocab_size).sum(0)


def count_tokens_split(
    samples: Iterable[tuple[torch.Tensor, torch.Tensor]], vocab_size: int, parts: int = 1
) -> torch.Tensor:
    """Like `count_tokens`, sample i counted into part i % parts -> [parts, V] (a split to
    measure coverage on samples the ranking did not see)."""
    counts = torch.zeros(parts, vocab_size, dtype=torch.int64)
    for i, (ids, mask) in enumerate(samples):
        kept = ids.long()[mask.bool()]
        counts[i % parts] += torch.bincount(kept.clamp_(0, vocab_size - 1), minlength=vocab_size)
    return counts


def build_mapping(counts: torch.Tensor, draft_vocab_size: int) -> VocabMapping:
    """Top-`draft_vocab_size` ids by count (ties -> lower id); unseen ids fill up by lowest id."""
    vocab = counts.numel()
    if not 0 < draft_vocab_size <= vocab:
        raise InputError(f"draft vocab size {draft_vocab_size} outside 1..{vocab}")
    # Stable sort on -count keeps lower ids first among equal counts (unseen ones included).
    order = torch.sort(-counts, stable=True).indices
    kept = torch.sort(order[:draft_vocab_size]).values  # draft ids follow target id order
    d2t = kept - torch.arange(draft_vocab_size)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[kept] = True
    return VocabMapping(d2t=d2t, t2d=t2d, counts=counts.clone())


# Draft step cost in target decode steps, linear in the draft vocab (reference/cpu-costs.md
# section 4, SmolLM2-135M + 1-layer EAGLE-3 on a 2-core CPU: 0.065 at 8,192 rows, 0.148 at
# 32,000, 0.204 at 49,152 -> 3.49e-6 per row on top of 0.0365 for the layer itself).
STEP_COST_BASE = 0.0365
STEP_COST_PER_ROW = 3.49e-6
VERIFY_COST = 1.37  # target verify forward padded to q=5 (k <= 4), in decode steps
CANDIDATE_SIZES = (1024, 2048, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152, 65536)


def coverage_curve(
    counts: torch.Tensor, sizes: Iterable[int], measured_on: torch.Tensor | None = None
) -> dict[int, float]:
    """counts [V] -> {n: share of `measured_on`'s tokens among the n ids most frequent in counts}.

    `measured_on` (default: counts itself) should be tokens *not* used for the ranking: the
    in-sample share flatters a small vocab built from few records (it reaches 1.0 at the
    number of distinct ids seen, however many the target really uses).
    """
    measured = counts if measured_on is None else measured_on
    total = int(measured.sum())
    order = torch.sort(-counts, stable=True).indices  # ties -> lower id, as build_mapping
    ranked = measured[order].cumsum(0)  # [V]
    out = {}
    for n in sizes:
        n = min(int(n), counts.numel())
        out[n] = float(ranked[n - 1]) / total if total and n > 0 else 0.0
    return out


def coverage_of(mapping: VocabMapping, counts: torch.Tensor) -> float:
    """Share of `counts` (e.g. another prompt source's target tokens) inside the draft vocab."""
    total = int(counts.sum())
    return float(counts[mapping.t2d].sum()) / total if total else 0.0


def expected_speedup(
    coverage: float,
    draft_vocab_size: int,
    k: int = 4,
    accept: float = 0.7,
    verify_cost: float = VERIFY_COST,
) -> float:
    """Speed-up over the target alone for a k-token draft chain, from the cost model.

    A drafted token is accepted with probability `accept * coverage` (`accept`: how often the
    draft agrees with the target when the target's token is in the draft vocab; tokens outside
    it are certain misses), so AL = 1 + sum_{i=1..k} (accept * coverage)^i. A round costs k
    draft steps + one verify forward (units: one target decode step), speed-up = AL / cost.
    """
    a = accept * coverage
    al = 1.0 + sum(a**i for i in range(1, k + 1))
    step = STEP_COST_BASE + STEP_COST_PER_ROW * draft_vocab_size
    return al / (k * step + verify_cost)


def choose_vocab_size(
    counts: torch.Tensor,
    k: int = 4,
    accept: float = 0.7,
    measured_on: torch.Tensor | None = None,
) -> tuple[int, list[dict[str, float]]]:
    """counts [V] -> (the candidate size with the best expected speed-up, the table it used).

    Candidates are `CANDIDATE_SIZES` below the target vocab plus the whole vocab; coverage is
    measured on `measured_on` (held-out counts, see `coverage_curve`). Sizes past the number of
    distinct ids gain no coverage, so the cost model never picks them.
    """
    vocab = counts.numel()
    sizes = sorted({n for n in CANDIDATE_SIZES if n < vocab} | {vocab})
    if measured_on is not None and int(measured_on.sum()) == 0:
        measured_on = None  # nothing held out (one sample): in-sample coverage
    cov = coverage_curve(counts, sizes, measured_on)
    table = [
        {"size": n, "coverage": cov[n], "speedup": expected_speedup(cov[n], n, k, accept)}
        for n in sizes
    ]
    best = max(table, key=lambda r: (r["speedup"], -r["size"]))
    return int(best["size"]), table
