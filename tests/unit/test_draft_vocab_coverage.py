"""Draft vocab coverage and size selection by the cost model (draft/vocab.py)."""

from __future__ import annotations

import pytest
import torch

from specctl.draft.vocab import (
    build_mapping,
    choose_vocab_size,
    count_tokens,
    count_tokens_split,
    coverage_curve,
    coverage_of,
    expected_speedup,
)

pytestmark = pytest.mark.unit
V = 49152  # SmolLM2's vocabulary


def test_coverage_curve_counts_top_n_share() -> None:
    counts = torch.tensor([0, 5, 1, 3, 0, 1])  # 10 tokens; ranked 5, 3, 1, 1
    assert coverage_curve(counts, [1, 2, 3, 4, 6, 99]) == {
        1: 0.5,
        2: 0.8,
        3: 0.9,
        4: 1.0,
        6: 1.0,  # 99 is capped at the vocabulary
    }
    assert coverage_curve(torch.zeros(4, dtype=torch.long), [2]) == {2: 0.0}


def test_coverage_of_another_source() -> None:
    m = build_mapping(torch.tensor([9, 0, 4, 0, 1]), 2)  # keeps ids 0 and 2
    other = count_tokens([(torch.tensor([0, 1, 2, 3]), torch.tensor([1, 1, 1, 0]))], 5)
    assert coverage_of(m, other) == pytest.approx(2 / 3)  # id 3 is masked out, 1 is a miss
    assert m.coverage() == pytest.approx(13 / 14)


def test_speedup_model_trades_coverage_against_head_rows() -> None:
    # Better coverage helps, more head rows cost: both directions of the trade-off.
    assert expected_speedup(0.99, 8192) > expected_speedup(0.90, 8192)
    assert expected_speedup(0.95, 8192) > expected_speedup(0.95, 32768)
    # reference/cpu-costs.md: 8k vocab, k=4 costs 0.245 + 1.37 decode steps a round.
    assert expected_speedup(1.0, 8192, accept=1.0) == pytest.approx(5 / 1.63, rel=0.01)


def test_concentrated_output_picks_the_smallest_vocab_that_covers_it() -> None:
    counts = torch.zeros(V, dtype=torch.long)
    counts[torch.randperm(V, generator=torch.Generator().manual_seed(0))[:900]] = 7
    size, table = choose_vocab_size(counts)
    assert size == 1024
    assert [r["size"] for r in table][-1] == V and table[0]["coverage"] == 1.0


def test_flat_output_needs_a_vocab_that_reaches_it() -> None:
    counts = torch.zeros(V, dtype=torch.long)
    counts[:20000] = 3  # uniform over 20k ids: coverage n / 20000 up to 20k
    size, _ = choose_vocab_size(counts)
    assert size == 24576  # the first candidate covering everything


def test_heavy_head_light_tail_keeps_the_head_only() -> None:
    # 95% of tokens among 2,000 ids, 5% spread over 30,000 more: the tail is not worth its rows.
    counts = torch.zeros(V, dtype=torch.long)
    counts[:2000] = 30000 * 19
    counts[2000:32000] = 2000
    size, table = choose_vocab_size(counts)
    assert size == 2048
    cov = {int(r["size"]): r["coverage"] for r in table}
    assert cov[2048] == pytest.approx(0.95 + 0.05 * 48 / 30000)
    # A much more accurate draft makes the misses costlier, yet not by 30k rows.
    assert choose_vocab_size(counts, accept=0.95)[0] == 2048


def test_split_counts_and_held_out_coverage_keep_a_small_sample_honest() -> None:
    # The target uses 6,000 ids (Zipf-like); 300 sampled tokens see only a few hundred of them.
    g = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, 6001, dtype=torch.float64)
    ids = torch.randperm(V, generator=g)[:6000]  # frequency unrelated to id order
    draws = ids[torch.multinomial(weights, 600, replacement=True, generator=g)]
    samples = [(draws[i : i + 10], torch.ones(10)) for i in range(0, 600, 10)]
    halves = count_tokens_split(samples, V, 2)
    assert halves.shape == (2, V) and int(halves.sum()) == 600
    assert torch.equal(halves.sum(0), count_tokens(samples, V))
    assert int(halves[0].sum()) == int(halves[1].sum()) == 300  # alternate samples
    in_sample = coverage_curve(halves[0], [1024])[1024]
    held_out = coverage_curve(halves[0], [1024], measured_on=halves[1])[1024]
    assert in_sample == 1.0 and held_out < 0.9  # the unseen part of the target's usage shows
    sizes = [1024, 8192, V]
    assert list(coverage_curve(halves[0], sizes, measured_on=halves[1]).values()) == sorted(
        coverage_curve(halves[0], sizes, measured_on=halves[1]).values()
    )
    # Nothing held out (a single sample): falls back to in-sample coverage.
    _, table = choose_vocab_size(halves[0], measured_on=torch.zeros(V, dtype=torch.long))
    assert table[0]["coverage"] == 1.0
    _, table = choose_vocab_size(halves[0], measured_on=halves[1])
    assert table[0]["coverage"] == pytest.approx(held_out)
