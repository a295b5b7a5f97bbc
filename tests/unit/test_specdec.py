"""The speculative decoding loop on a tiny random Llama: lossless, accounting, padding."""

from __future__ import annotations

import pytest
import torch

from specctl.evaluate.drafters import PromptLookupDrafter
from specctl.evaluate.specdec import (
    Proposal,
    speculative_decode,
    target_decode,
    verify_len,
)
from specctl.evaluate.verifier import VERIFY_SHAPES_MKL, Verifier

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
