"""Decoding that pays: the fused draft step equals the reference one, padded verify and adaptive k
keep greedy output identical for any draft, and eval-accept's table shows where time goes."""

from __future__ import annotations

import pytest
import torch

from specctl.draft.eagle3 import DraftCache, Eagle3Config, Eagle3Draft
from specctl.evaluate import report
from specctl.evaluate.drafters import Eagle3Drafter
from specctl.evaluate.specdec import DecodeResult, speculative_decode, target_decode
from specctl.evaluate.verifier import Verifier

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

V, NEW = 200, 24


def _target_and_draft() -> tuple[torch.nn.Module, Eagle3Draft]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=8,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=5e4,
    )
    target = LlamaForCausalLM(cfg).eval()
    draft = Eagle3Draft(Eagle3Config.from_target_config(cfg.to_dict(), draft_vocab_size=V))
    with torch.no_grad():  # non-trivial norms so a mixed-up weight cannot hide
        for p in draft.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    draft.init_from_target(target.model.embed_tokens.weight.detach(), target.lm_head.weight)
    return target, draft.eval()


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, Eagle3Draft]:
    return _target_and_draft()


def _reference(draft, ids, hidden, pos, cache):  # type: ignore[no-untyped-def]
    h = draft.step(ids, hidden, pos, cache)  # unfused q/k/v, gate/up, RoPE per call
    return draft.logits(h), h


def test_fused_decode_equals_unfused(models) -> None:  # type: ignore[no-untyped-def]
    """Read 7 positions, then q=1 steps, a crop and a multi-token read: fused == reference."""
    _, draft = models
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (1, 12), generator=g)
    hidden = torch.randn(1, 12, 48, generator=g)
    pos = torch.arange(12)[None]
    fast, ref = DraftCache(capacity=4), DraftCache(capacity=4)  # capacity 4: growth on the way
    with torch.inference_mode():
        for a, b in [(0, 7), (7, 8), (8, 9), (9, 10), (8, 12)]:
            if a < fast.length:
                fast.crop(a)
                ref.crop(a)
            got = draft.decode(ids[:, a:b], hidden[:, a:b], pos[:, a:b], fast)
            want = _reference(draft, ids[:, a:b], hidden[:, a:b], pos[:, a:b], ref)
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert fast.length == ref.length == 12
    # The fused tensors are derived, not parameters: export names are untouched.
    assert not any("qkv" in k or "gate_up" in k for k in draft.state_dict())


def test_fused_weights_follow_parameter_updates() -> None:
    """An in-place weight change (an optimizer step) rebuilds the fused matmul weights."""
    _, draft = _target_and_draft()
    ids, hidden, pos = torch.tensor([[5, 9]]), torch.randn(1, 2, 48), torch.arange(2)[None]
    with torch.inference_mode():
        before = draft.decode(ids, hidden, pos, DraftCache())[0]
    with torch.no_grad():
        draft.midlayer.self_attn.k_proj.weight.mul_(-1.0)
        draft.midlayer.mlp.up_proj.weight.mul_(0.5)
    with torch.inference_mode():
        after = draft.decode(ids, hidden, pos, DraftCache())[0]
        want = _reference(draft, ids, hidden, pos, DraftCache())[0]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)


def _confidence_median(ver: Verifier, draft: Eagle3Draft, prompts: list[torch.Tensor]) -> float:
    """A threshold that cuts about half the chains: adaptive k really varies k."""
    confs = []
    for p in prompts:
        ver.reset()
        logits, aux = ver.forward(p, aux=True)
        d = Eagle3Drafter(draft)
        d.start(p, aux, int(logits[-1].argmax()))
        confs.append(float(torch.softmax(d._logits, -1).max()))
    return sorted(confs)[len(confs) // 2]


@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("adaptive", [True, False])
def test_padded_verify_and_adaptive_k_are_lossless(models, pad: bool, adaptive: bool) -> None:  # type: ignore[no-untyped-def]
    target, draft = models
    ver = Verifier(target)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in (5, 11, 17, 23)]
    thr = _confidence_median(ver, draft, prompts) if adaptive else 0.0
    proposed: list[int] = []
    for p in prompts:
        ref = target_decode(ver, p, max_new_tokens=NEW).tokens
        res = speculative_decode(
            ver, Eagle3Drafter(draft, adaptive_threshold=thr), p, k=4, max_new_tokens=NEW,
            pad_verify=pad,
        )  # fmt: skip
        assert res.tokens == ref  # padding left in the KV cache would shift later rounds
        proposed += res.proposed
    if adaptive:  # the cut fired (q=1 rounds) and did not fire (padded rounds)
        assert min(proposed) == 0 and max(proposed) >= 1
    else:
        assert max(proposed) == 4
    ver.close()


def test_table_shows_where_time_goes() -> None:
    from specctl.evaluate import metrics

    res = DecodeResult(tokens=[1] * 9, prefill_s=0.1, total_s=1.1, draft_s=0.2, verify_s=0.6)
    res.emitted, res.accepted, res.proposed = [3, 3, 2], [2, 2, 1], [4, 4, 2]
    row = metrics.summarize([res], k=4)
    row["speedup"] = 1.0
    ms, share = row["time_ms_per_round"], row["time_share"]
    assert ms == pytest.approx({"draft": 200 / 3, "verify": 200.0, "overhead": 200 / 3})
    assert share == pytest.approx({"draft": 0.2, "verify": 0.6, "overhead": 0.2})
    header, line = report.table({"eagle3": row})
    assert "draft ms" in header and "verify ms" in header and "overhead ms" in header
    assert "66.7 ( 20%)" in line and "200.0 ( 60%)" in line and line.count("66.7 ( 20%)") == 2
