"""Skinny linears: same results as F.linear, used only where they should be, undone cleanly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from specctl import skinny
from specctl.evaluate.specdec import speculative_decode, target_decode
from specctl.evaluate.verifier import VERIFY_SHAPES, VERIFY_SHAPES_MKL, Verifier
from specctl.skinny import skinny_enabled, skinny_linear, use_skinny_linears
from tests.models import tiny_llama


def _tiny() -> LlamaForCausalLM:
    return tiny_llama(layers=4)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(rows: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(300, 96, generator=g)
    b = torch.randn(300, generator=g) if bias else None
    x = torch.randn(1, rows, 96, generator=g)  # [B, q, K] as a decoder layer passes it
    out = skinny_linear(x, w, b)
    assert out.shape == (1, rows, 300) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_used_for_decode_rows_only(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny()
    calls: list[int] = []

    def counting(x, w, b):
        calls.append(x.numel() // x.shape[-1])
        return skinny_linear(x, w, b)

    monkeypatch.setattr(skinny, "skinny_linear", counting)
    n = use_skinny_linears(model)
    assert n == 4 * 7 + 1 and skinny_enabled(model)  # q, k, v, o, gate, up, down per layer + head
    ids = torch.arange(20)[None]
    with torch.inference_mode():
        model(ids)  # a 20-row prefill: F.linear
        assert calls == []
        model(ids[:, :5])  # a 5-row verify
    assert calls == [5] * n
    calls.clear()
    model(ids[:, :3]).logits.sum().backward()  # grad enabled (training): F.linear, grads flow
    assert calls == [] and model.lm_head.weight.grad is not None


def test_logits_match_and_switch_off() -> None:
    model = _tiny()
    ids = torch.arange(1, 7)[None]
    with torch.inference_mode():
        ref = model(ids).logits
        use_skinny_linears(model)
        fast = model(ids).logits
        use_skinny_linears(model, False)
        again = model(ids).logits
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(again, ref) and not skinny_enabled(model)


def test_verifier_applies_and_restores() -> None:
    model = _tiny()
    assert Verifier(model, skinny=False).verify_shapes == VERIFY_SHAPES_MKL
    ver = Verifier(model)
    assert skinny_enabled(model) and ver.verify_shapes == VERIFY_SHAPES
    prompt = torch.arange(3, 30)
    ref = target_decode(ver, prompt, max_new_tokens=12)

    class Guess:  # proposes the target's own continuation shifted: some accepted, some not
        name, needs_aux = "guess", False

        def start(self, prompt, aux, first) -> None:
            self.out = list(ref.tokens)
            self.n = 1

        def propose(self, k, temperature, gen):
            from specctl.evaluate.specdec import Proposal

            toks = self.out[self.n : self.n + k]
            if len(toks) > 1:
                toks[-1] = (toks[-1] + 1) % 256  # one wrong guess per round
            return Proposal(tokens=torch.tensor(toks, dtype=torch.long))

        def advance(self, tokens, aux) -> None:
            self.n += tokens.numel()

    spec = speculative_decode(ver, Guess(), prompt, k=4, max_new_tokens=12)
    assert spec.tokens == ref.tokens and max(spec.accepted) > 0
    ver.close()
    assert not skinny_enabled(model)
