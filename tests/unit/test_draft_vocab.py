"""Draft vocab mapping: top-k by masked frequency, offsets, save/load."""

from __future__ import annotations

import pytest
import torch

from specctl.draft.vocab import VocabMapping, build_mapping, count_tokens
from specctl.errors import InputError

pytestmark = pytest.mark.unit


def test_counts_under_loss_mask_and_top_k(tmp_path) -> None:
    ids = torch.tensor([7, 7, 7, 3, 3, 9, 1], dtype=torch.int32)
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 0], dtype=torch.uint8)  # token 1 is not counted
    counts = count_tokens([(ids, mask), (torch.tensor([9, 9]), torch.tensor([1, 1]))], 12)
    assert counts[[7, 3, 9, 1]].tolist() == [3, 2, 3, 0]
    m = build_mapping(counts, 3)
    assert m.target_ids().tolist() == [3, 7, 9]
    assert m.d2t.tolist() == [3, 6, 7]
    assert m.t2d.nonzero().flatten().tolist() == [3, 7, 9]
    assert m.coverage() == 1.0
    # More draft slots than seen tokens: unseen ids fill in by lowest id.
    assert build_mapping(counts, 5).target_ids().tolist() == [0, 1, 3, 7, 9]
    m.save(tmp_path / "vocab.safetensors")
    back = VocabMapping.load(tmp_path / "vocab.safetensors", vocab_size=12, draft_vocab_size=3)
    assert torch.equal(back.d2t, m.d2t) and torch.equal(back.t2d, m.t2d)
    with pytest.raises(InputError):
        VocabMapping.load(tmp_path / "vocab.safetensors", vocab_size=13)
    with pytest.raises(InputError):
        build_mapping(counts, 13)
