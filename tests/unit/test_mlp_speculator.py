"""MLP speculator numerics against an independent loop-form reference, tying, scale_input."""

from __future__ import annotations

import math

import pytest
import torch

from specctl.draft.mlp import MLPSpeculator, MLPSpeculatorConfig

pytestmark = pytest.mark.unit


def _randomize(m: MLPSpeculator, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _ref_norm(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    # vLLM MLPSpeculatorLayerNorm, written out per element: x / sqrt(mean(x^2) + 1e-6) * w + b
    ms = sum(float(v) ** 2 for v in x) / len(x)
    y = torch.tensor([float(v) / math.sqrt(ms + 1e-6) for v in x], dtype=torch.float64)
    return y if w is None else y * w.double() + b.double()


@torch.no_grad()
def _ref_logits(m: MLPSpeculator, hidden: torch.Tensor, ids: list[int], t: int) -> list:
    """Loop form of vLLM's generate_proposals for one row: hidden [H], ids[t+1+i] consumed."""
    n = m.cfg.n_predict
    sw = 0.5 ** (0.5 / n)
    ew = math.sqrt((1 - sw**2) * (m.cfg.inner_dim / 2))
    state = hidden.double()
    if m.cfg.scale_input:
        state = _ref_norm(state, None, None) / math.sqrt(2)
    out = []
    for i in range(n):
        z = m.emb[i].weight[ids[t + 1 + i]].double()
        x = m.proj[i].weight.double() @ state + z * (ew / sw)
        x = _ref_norm(x, m.ln[i].weight, m.ln[i].bias)
        state = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))  # exact GELU
        out.append(m.head[i].weight.double() @ state)
    return out


@pytest.mark.parametrize(
    "tie,scale,inner", [(False, False, 0), (True, False, 0), (False, True, 12), (True, True, 12)]
)
def test_heads_match_loop_reference(tie: bool, scale: bool, inner: int) -> None:
    cfg = MLPSpeculatorConfig(
        emb_dim=8, inner_dim=inner, vocab_size=11, n_predict=3, tie_weights=tie, scale_input=scale
    )
    m = MLPSpeculator(cfg).double()
    _randomize(m)
    b, t = 2, 5
    hidden = torch.randn(b, t, 8, dtype=torch.float64)
    ids = torch.randint(0, 11, (b, t + 3))  # x_0 .. x_{t+2}
    logits = m(hidden, ids[:, 1:])  # tokens[:, j] = x_{j+1}
    assert logits.shape == (3, b, t, 11)
    for row in range(b):
        for pos in range(t):
            ref = _ref_logits(m, hidden[row, pos], ids[row].tolist(), pos)
            for i in range(3):
                torch.testing.assert_close(logits[i, row, pos], ref[i], rtol=1e-9, atol=1e-9)


def test_step_and_propose_follow_the_forward() -> None:
    m = MLPSpeculator(MLPSpeculatorConfig(emb_dim=8, vocab_size=13, n_predict=3))
    _randomize(m, 1)
    hidden, tok = torch.randn(4, 8), torch.randint(0, 13, (4,))
    prop = m.propose(hidden, tok)  # [4, 3]
    # teacher-forcing the proposed chain reproduces each head's argmax
    tokens = torch.cat([tok[:, None], prop[:, :2]], dim=1)  # [4, 3] = x_{t+1}, guesses
    logits = m(hidden[:, None], tokens)  # [3, 4, 1, V]
    assert torch.equal(logits[:, :, 0].argmax(-1).t(), prop)
    assert m.propose(hidden, tok, n=2).shape == (4, 2)


def test_tie_weights_shares_like_vllm() -> None:
    m = MLPSpeculator(MLPSpeculatorConfig(emb_dim=8, inner_dim=6, vocab_size=10, n_predict=4,
                                          tie_weights=True))  # fmt: skip
    names = {n for n, _ in m.named_parameters()}
    assert names == {
        "emb.0.weight",
        "proj.0.weight",
        "proj.1.weight",
        "ln.0.weight",
        "ln.0.bias",
        *(f"head.{i}.weight" for i in range(4)),
    }
    assert m.emb[3].weight is m.emb[0].weight and m.ln[2].bias is m.ln[0].bias
    assert m.proj[3].weight is m.proj[1].weight and m.proj[0].weight.shape == (6, 8)
    assert m.head[1].weight is not m.head[0].weight  # vLLM keeps one LM head per slot
    sd = m.state_dict()  # every slot name present (vLLM reads the first of tied ones)
    assert {"emb.3.weight", "proj.3.weight", "ln.3.weight"} <= set(sd)


def test_untied_names_and_shapes_are_vllms() -> None:
    m = MLPSpeculator(MLPSpeculatorConfig(emb_dim=8, inner_dim=6, vocab_size=10, n_predict=2,
                                          scale_input=True))  # fmt: skip
    shapes = {n: tuple(p.shape) for n, p in m.state_dict().items()}
    assert shapes == {
        "emb.0.weight": (10, 6),
        "emb.1.weight": (10, 6),
        "proj.0.weight": (6, 8),
        "proj.1.weight": (6, 6),
        "head.0.weight": (10, 6),
        "head.1.weight": (10, 6),
        "ln.0.weight": (6,),
        "ln.0.bias": (6,),
        "ln.1.weight": (6,),
        "ln.1.bias": (6,),
    }  # ln0 has no parameters (elementwise_scale_and_shift=False, as in vLLM)
    assert m.state_weight == pytest.approx(0.5**0.25)
    assert m.emb_weight == pytest.approx(math.sqrt((1 - 0.5**0.5) * 3))


def test_config_round_trip_and_init_from_target() -> None:
    cfg = MLPSpeculatorConfig.from_target_config({"hidden_size": 8, "vocab_size": 10})
    assert cfg.inner_dim == 8 and MLPSpeculatorConfig.from_dict(cfg.to_dict()) == cfg
    m = MLPSpeculator(cfg)
    emb, head = torch.randn(10, 8), torch.randn(10, 8)
    assert m.init_from_target(emb, head)
    assert all(torch.equal(e.weight, emb) for e in m.emb)
    assert torch.equal(m.head[2].weight, head)
    small = MLPSpeculator(MLPSpeculatorConfig(emb_dim=8, inner_dim=4, vocab_size=10))
    assert not small.init_from_target(emb, head)
    with pytest.raises(ValueError):
        MLPSpeculatorConfig(emb_dim=8, n_predict=1, tie_weights=True)
