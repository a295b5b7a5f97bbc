"""Temperature > 0: the speculative sampling rule leaves the target's distribution unchanged."""

from __future__ import annotations

import pytest
import torch

from specctl.evaluate.specdec import Proposal, accept_sampled, speculative_decode
from specctl.evaluate.verifier import Verifier

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

V = 6


def _first_emitted(p: torch.Tensor, q: torch.Tensor | None, trials: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V)
    for _ in range(trials):
        if q is None:
            draft = torch.tensor([2, 4])
        else:
            draft = torch.stack([torch.multinomial(q[i], 1, generator=gen)[0] for i in range(2)])
        n, nxt = accept_sampled(p, q, draft, gen)
        counts[int(draft[0]) if n >= 1 else nxt] += 1
    return counts / trials


@pytest.mark.parametrize("with_q", [True, False])
def test_first_emitted_token_follows_target(with_q: bool) -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, V, generator=g) * 1.5, -1)  # [k+1, V]
    q = torch.softmax(torch.randn(2, V, generator=g) * 1.5, -1) if with_q else None  # [k, V]
    freq = _first_emitted(p, q, trials=20000, seed=1)
    assert (freq - p[0]).abs().max() < 0.015, (freq, p[0])
    # and the rule does something: the draft's own distribution is visibly different
    if q is not None:
        assert (q[0] - p[0]).abs().max() > 0.05


def test_identical_draft_is_always_accepted() -> None:
    p = torch.softmax(torch.randn(3, V), -1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        draft = torch.stack([torch.multinomial(p[i], 1, generator=gen)[0] for i in range(2)])
        n, _ = accept_sampled(p, p[:2], draft, gen)
        assert n == 2


class FixedQDrafter:
    """Samples every draft token from one fixed distribution over the vocab."""

    name, needs_aux = "fixed-q", False

    def __init__(self, q: torch.Tensor) -> None:
        self.q = q

    def start(self, prompt, aux, first) -> None:
        pass

    def propose(self, k, temperature, gen) -> Proposal:
        toks = torch.multinomial(self.q, k, replacement=True, generator=gen)
        return Proposal(tokens=toks, probs=self.q.expand(k, -1))

    def advance(self, tokens, aux) -> None:
        pass


def test_end_to_end_second_token_marginal() -> None:
    """Decode 2 tokens many times: the speculatively emitted 2nd token has the target's marginal."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharpen: make p far from uniform and from q
    ver = Verifier(model)
    prompt = torch.tensor([1, 3, 0, 5])
    temp = 1.0
    # exact marginal of token 2: sum_i p1(i) p2(. | i)
    ver.reset()
    p1 = torch.softmax(ver.forward(prompt)[0][-1] / temp, -1)
    exact = torch.zeros(V)
    for i in range(V):
        ver.reset()
        exact += p1[i] * torch.softmax(
            ver.forward(torch.cat([prompt, torch.tensor([i])]))[0][-1], -1
        )
    q = torch.full((V,), 0.05)  # a draft far from the target: mass on its least likely token
    q[exact.argmin()] = 1.0 - 0.05 * (V - 1)
    gen = torch.Generator().manual_seed(2)
    counts = torch.zeros(V)
    trials = 500
    for _ in range(trials):
        res = speculative_decode(
            ver, FixedQDrafter(q), prompt, k=2, max_new_tokens=2, temperature=temp, gen=gen
        )
        counts[res.tokens[1]] += 1
    freq = counts / trials
    assert (freq - exact).abs().max() < 0.08, (freq, exact)
    assert (exact - q).abs().max() > 0.25  # the test can fail: q alone would not pass
