"""The speculative decoding loop on a tiny random Llama: lossless, accounting, padding."""

from __future__ import annotations

import pytest
import torch

from specctl.evaluate.drafters import PromptLookupDrafter
from specctl.evaluate.specdec import (
    CostModel,
    Proposal,
    speculative_decode,
    target_decode,
    verify_len,
)
from specctl.evaluate.verifier import VERIFY_COSTS, VERIFY_SHAPES, VERIFY_SHAPES_MKL, Verifier

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def verifier() -> Verifier:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return Verifier(LlamaForCausalLM(cfg).eval())


def _prompts(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g)
        for _ in range(n)
    ]


class OracleDrafter:
    """Proposes the target's own greedy continuation (known in advance)."""

    name, needs_aux = "oracle", False

    def __init__(self, ref: list[int]) -> None:
        self.ref, self.n = ref, 0

    def start(self, prompt, aux, first) -> None:
        assert first == self.ref[0]
        self.n = 1

    def propose(self, k, temperature, gen) -> Proposal:
        return Proposal(tokens=torch.tensor(self.ref[self.n : self.n + k], dtype=torch.long))

    def advance(self, tokens, aux) -> None:
        self.n += tokens.numel()


class RandomDrafter:
    name, needs_aux = "random", True

    def __init__(self, vocab: int, seed: int = 0) -> None:
        self.vocab, self.g = vocab, torch.Generator().manual_seed(seed)

    def start(self, prompt, aux, first) -> None:
        assert aux is not None and aux.shape[0] == prompt.numel()

    def propose(self, k, temperature, gen) -> Proposal:
        return Proposal(tokens=torch.randint(0, self.vocab, (k,), generator=self.g))

    def advance(self, tokens, aux) -> None:
        assert aux is not None and aux.shape[0] == tokens.numel()


def test_verify_len_pads_to_cheap_shapes() -> None:
    assert [verify_len(n) for n in (1, 2, 3, 4, 5, 6, 7, 8, 9)] == [1, 2, 4, 4, 5, 6, 8, 8, 9]
    mkl = [verify_len(n, shapes=VERIFY_SHAPES_MKL) for n in (1, 2, 3, 4, 5, 6, 8, 9)]
    assert mkl == [1, 5, 5, 5, 5, 8, 8, 9]
    assert verify_len(3, pad=False) == 3


def test_padding_does_not_change_real_positions(verifier: Verifier) -> None:
    prompt = _prompts(1)[0]
    verifier.reset()
    verifier.forward(prompt)
    real = torch.tensor([5, 6, 7])
    a, aux_a = verifier.forward(real, aux=True)
    verifier.crop(3)
    b, aux_b = verifier.forward(torch.cat([real, torch.tensor([7, 7, 7, 7, 7])]), aux=True)
    assert torch.allclose(a, b[:3], atol=1e-5) and torch.equal(a.argmax(-1), b[:3].argmax(-1))
    assert aux_a is not None and aux_b is not None and torch.allclose(aux_a, aux_b[:3], atol=1e-5)
    assert aux_a.shape == (3, 3 * 64)


@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("k", [1, 4, 6])
def test_greedy_is_lossless(verifier: Verifier, k: int, pad: bool) -> None:
    for i, prompt in enumerate(_prompts(12)):
        ref = target_decode(verifier, prompt, max_new_tokens=24).tokens
        for drafter in (RandomDrafter(256, seed=i), PromptLookupDrafter()):
            got = speculative_decode(
                verifier, drafter, prompt, k=k, max_new_tokens=24, pad_verify=pad
            ).tokens
            assert got == ref, (drafter.name, i)


def test_oracle_drafter_accepts_everything(verifier: Verifier) -> None:
    k, new = 4, 33
    for prompt in _prompts(4):
        ref = target_decode(verifier, prompt, max_new_tokens=new).tokens
        res = speculative_decode(verifier, OracleDrafter(ref), prompt, k=k, max_new_tokens=new)
        assert res.tokens == ref
        # every round but the last emits k+1; the last is cut by the budget
        assert res.emitted[:-1] == [k + 1] * (res.rounds - 1)
        assert res.accepted[:-1] == [k] * (res.rounds - 1)
        assert sum(res.emitted) == new - 1 and res.emitted[-1] <= k + 1


def test_eos_stops_and_is_kept(verifier: Verifier) -> None:
    prompt = _prompts(1, seed=3)[0]
    ref = target_decode(verifier, prompt, max_new_tokens=30).tokens
    eos = ref[7]
    want = ref[: ref.index(eos) + 1]
    assert target_decode(verifier, prompt, max_new_tokens=30, eos_ids=(eos,)).tokens == want
    res = speculative_decode(
        verifier, OracleDrafter(ref), prompt, k=4, max_new_tokens=30, eos_ids=(eos,)
    )
    assert res.tokens == want


def test_random_drafter_acceptance_length_near_one(verifier: Verifier) -> None:
    emitted = rounds = 0
    for i, prompt in enumerate(_prompts(6)):
        res = speculative_decode(
            verifier, RandomDrafter(256, seed=i), prompt, k=4, max_new_tokens=24
        )
        emitted, rounds = emitted + sum(res.emitted), rounds + res.rounds
    assert 1.0 <= emitted / rounds < 1.15


def test_prompt_lookup_min_ngram_skips_one_token_matches() -> None:
    one, two = PromptLookupDrafter(), PromptLookupDrafter(min_ngram=2)
    for d in (one, two):  # history 5 6 7 8 6 9 6: the bigram "9 6" is new, "6" is not
        d.start(torch.tensor([5, 6, 7, 8, 6, 9]), None, 6)
    assert one.propose(3, 0.0, None).tokens.tolist() == [9, 6]  # after the latest "6"
    assert two.propose(3, 0.0, None).tokens.numel() == 0
    for d in (one, two):  # ... 6 7: the bigram "6 7" was seen at the start
        d.advance(torch.tensor([7]), None)
        assert d.propose(3, 0.0, None).tokens.tolist() == [8, 6, 9]


SKINNY = CostModel(VERIFY_COSTS, VERIFY_SHAPES, step=0.0)


def test_cost_model_weighs_confidence_against_the_cost_curve() -> None:
    # q=2 costs 1.06 steps: a 20%-sure single guess pays for itself ...
    assert SKINNY.best_length([0.2]) == 1
    # ... but not at 5%, and an expensive curve (q=2 at 1.65) wants far more
    assert SKINNY.best_length([0.05]) == 0
    assert CostModel((1.0, 1.65), (2,), step=0.0).best_length([0.2]) == 0
    # a second token pads 3 -> 4 (1.38): worth it only when the chain stays likely; a third
    # rides on the same shape, so a confident chain is kept whole up to q=4
    assert SKINNY.best_length([0.5, 0.1]) == 1
    assert SKINNY.best_length([0.9, 0.8, 0.7]) == 3
    assert SKINNY.best_length([]) == 0
    # always the argmax of expected tokens per decode step, draft steps included
    with_steps = CostModel(VERIFY_COSTS, VERIFY_SHAPES, step=0.05)
    confs = [0.7, 0.5, 0.35, 0.2]
    rates = [(1 + sum(confs[:n])) / (SKINNY.verify(n + 1) + 4 * 0.05) for n in range(5)]
    assert with_steps.best_length(confs) == max(range(5), key=rates.__getitem__)
    assert SKINNY.verify(3) == VERIFY_COSTS[3]  # q=3 is padded to 4


def test_cost_model_stops_drafting_when_nothing_more_can_pay() -> None:
    assert SKINNY.worth_drafting([], 4)
    assert SKINNY.worth_drafting([0.9], 4)  # 0.9, 0.81, 0.73: q=4 would pay
    assert not SKINNY.worth_drafting([0.5], 4)  # 0.5, 0.25, 0.125: one token is the best
    assert not SKINNY.worth_drafting([0.9, 0.3], 4)  # the chain just lost its nerve
    assert not SKINNY.worth_drafting([0.9, 0.8, 0.7, 0.6], 4)  # k reached


def test_prompt_lookup_learns_how_often_its_guesses_are_right() -> None:
    d = PromptLookupDrafter(learn_confidence=True)
    d.start(torch.tensor([1, 2, 3, 4] * 3), None, 1)  # "4 1" was seen: guess 2 3 4 1
    p = d.propose(4, 0.0, None)
    assert p.tokens.tolist() == [2, 3, 4, 1] and p.conf == [0.5] * 4  # the prior
    d.advance(torch.tensor([2, 3, 4, 1, 2]), None)  # all four right
    p = d.propose(4, 0.0, None)  # "1 2" again: guess 3 4 1 2
    assert p.conf == [2 / 3] * 4
    d.advance(torch.tensor([9]), None)  # the first guess wrong: only position 0 is known
    assert d._tried[2] == [2, 1, 1, 1] and d._right[2] == [1, 1, 1, 1]
    assert d._confidence(2, torch.zeros(4)) == [0.5] * 4  # 2/4, and never above position 0
    assert PromptLookupDrafter().propose(4, 0.0, None).conf is None  # the plain baseline
