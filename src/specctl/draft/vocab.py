"""Draft vocabulary: the `draft_vocab_size` most frequent target tokens under the loss mask.

`d2t` [Vd] int64 holds offsets (target id = draft id + d2t[draft id], the SGLang / vLLM /
SpecForge convention); `t2d` [V] bool marks target ids that are in the draft vocab. Draft ids
are the kept target ids in increasing order. The mapping is computed once (rank 0), saved as
safetensors, and every rank loads the same file, so producers and trainers cannot diverge.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from specctl.errors import InputError


@dataclass
class VocabMapping:
    d2t: torch.Tensor  # [Vd] int64 offsets
    t2d: torch.Tensor  # [V] bool
    counts: torch.Tensor  # [V] int64 token counts it was built from

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
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for ids, mask in samples:
        kept = ids.long()[mask.bool()]
        counts += torch.bincount(kept.clamp_(0, vocab_size - 1), minlength=vocab_size)
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
