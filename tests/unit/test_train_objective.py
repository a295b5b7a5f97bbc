"""TTT objective vs a loop-form reference (explicit per-query attention), and fp64 gradchecks."""

from __future__ import annotations

import math

import pytest
import torch

from specctl.draft.eagle3 import Eagle3Config, Eagle3Draft, apply_rope, rope_cos_sin
from specctl.train.loss import linear_soft_ce
from specctl.train.objective import TargetHead, simulated_al, ttt_loss
from specctl.train.ttt_attention import TTTAttention

pytestmark = pytest.mark.unit

V, VD, H = 50, 20, 16


def tiny_draft(seed: int = 0) -> tuple[Eagle3Draft, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    cfg = Eagle3Config(
        hidden_size=H,
        intermediate_size=24,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        vocab_size=V,
        draft_vocab_size=VD,
        rope_theta=100.0,
    )
    draft = Eagle3Draft(cfg).double()
    for p in draft.parameters():  # non-trivial norms
        torch.nn.init.normal_(p, 0.0, 0.5) if p.dim() == 1 else None
    kept = torch.sort(torch.randperm(V)[:VD]).values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[kept] = True
    draft.set_vocab(kept - torch.arange(VD), t2d)
    head_w = torch.randn(V, H, dtype=torch.float64)
    head_w[kept] *= 2.0  # most (not all) target argmaxes fall in the draft vocab
    return draft, head_w, t2d


def reference_loss(
    draft: Eagle3Draft,
    head_w: torch.Tensor,
    t2d: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    aux: torch.Tensor,
    last: torch.Tensor,
    K: int,
) -> tuple[torch.Tensor, list[int]]:
    """Row by row: step-k query at row t attends to step-0 keys 0..t and diag keys of 1..k."""
    cfg, layer = draft.cfg, draft.midlayer
    att = layer.self_attn
    B, T = ids.shape
    g = att.nh // att.nkv
    total = torch.zeros((), dtype=torch.float64)
    hits_per_step = [0] * K
    for b in range(B):
        h = draft.fc(aux[b])  # [T, H]
        keys: list[torch.Tensor] = []
        vals: list[torch.Tensor] = []
        for k in range(K):
            tok = torch.tensor([int(ids[b, t + k + 1]) if t + k + 1 < T else 0 for t in range(T)])
            x = torch.cat(
                [layer.input_layernorm(draft.embed_tokens(tok)), layer.hidden_norm(h)], -1
            )
            cos, sin = rope_cos_sin(
                (torch.arange(T) + k)[None], cfg.head_dim, cfg.rope_theta, x.dtype
            )
            q = apply_rope(att.q_proj(x).view(T, att.nh, att.d).transpose(0, 1)[None], cos, sin)[0]
            kk = apply_rope(att.k_proj(x).view(T, att.nkv, att.d).transpose(0, 1)[None], cos, sin)[
                0
            ]
            keys.append(kk)
            vals.append(att.v_proj(x).view(T, att.nkv, att.d).transpose(0, 1))
            outs = []
            for t in range(T):
                heads = []
                for hd in range(att.nh):
                    kv = hd // g
                    ks = [keys[0][kv, s] for s in range(t + 1)] + [
                        keys[j][kv, t] for j in range(1, k + 1)
                    ]
                    vs = [vals[0][kv, s] for s in range(t + 1)] + [
                        vals[j][kv, t] for j in range(1, k + 1)
                    ]
                    w = torch.softmax(
                        torch.stack([q[hd, t] @ kx for kx in ks]) / math.sqrt(att.d), 0
                    )
                    heads.append(sum(wi * vi for wi, vi in zip(w, vs, strict=True)))
                outs.append(torch.cat(heads))
            mid = h + att.o_proj(torch.stack(outs))
            h = mid + layer.mlp(layer.post_attention_layernorm(mid))
            ce, hits = torch.zeros((), dtype=torch.float64), 0
            for t in range(T):
                p = t + k + 1
                if p >= T or not mask[b, p]:
                    continue
                tl = last[b, p] @ head_w.t()
                if not t2d[tl.argmax()]:
                    continue
                tp = torch.softmax(tl[t2d], 0)
                logits = draft.lm_head(draft.norm(h[t]))
                ce = ce - (tp * torch.log_softmax(logits, 0)).sum()
                hits += int(logits.argmax() == tp.argmax())
            total = total + 0.8**k * ce / float(mask[:, k + 1 :].sum())
            hits_per_step[k] += hits
    return total, hits_per_step


def test_ttt_loss_matches_loop_reference() -> None:
    draft, head_w, t2d = tiny_draft()
    B, T, K = 2, 7, 3
    ids = torch.randint(0, V, (B, T))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1, 0]])
    aux = torch.randn(B, T, 3 * H, dtype=torch.float64)
    last = torch.randn(B, T, H, dtype=torch.float64)
    oov = int((~t2d).nonzero()[0])
    last[0, 4] = head_w[oov] * 5  # this target's argmax is outside the draft vocab
    with torch.no_grad():  # draft head = target rows: some top-1 hits to count
        draft.lm_head.weight.copy_(head_w[t2d])
    res = ttt_loss(draft, TargetHead(head_w, t2d), ids, mask, aux, last, ttt_length=K)
    ref_total, ref_hits = reference_loss(draft, head_w, t2d, ids, mask, aux, last, K)
    torch.testing.assert_close(res.loss, ref_total)
    assert res.hits.tolist() == ref_hits
    assert res.count.tolist() == [9, 8, 6]
    assert res.valid.sum() < res.count.sum()  # some targets fell outside the vocab: masked
    params = [p for p in draft.parameters() if p.requires_grad]
    got = torch.autograd.grad(res.loss, params)
    want = torch.autograd.grad(ref_total, params)
    for gv, wv in zip(got, want, strict=True):
        torch.testing.assert_close(gv, wv)


def test_ttt_attention_gradcheck_fp64() -> None:
    torch.manual_seed(3)
    B, NH, NKV, T, D, K = 1, 4, 2, 5, 3, 3
    qs = [torch.randn(B, NH, T, D, dtype=torch.float64, requires_grad=True) for _ in range(K)]
    ks = [torch.randn(B, NKV, T, D, dtype=torch.float64, requires_grad=True) for _ in range(K)]
    vs = [torch.randn(B, NKV, T, D, dtype=torch.float64, requires_grad=True) for _ in range(K)]

    def run(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        attn = TTTAttention()
        outs = []
        for i in range(K):
            outs.append(attn.attend(0, flat[i], flat[K + i], flat[2 * K + i]))
            attn.commit(T)
        return tuple(outs)

    assert torch.autograd.gradcheck(run, (*qs, *ks, *vs))
    # and the values: explicit joint softmax for the last step, row 2, head 3
    out = run(*qs, *ks, *vs)[K - 1]
    t, hd, kv = 2, 3, 1
    keys = [ks[0][0, kv, s] for s in range(t + 1)] + [ks[j][0, kv, t] for j in range(1, K)]
    vals = [vs[0][0, kv, s] for s in range(t + 1)] + [vs[j][0, kv, t] for j in range(1, K)]
    w = torch.softmax(torch.stack([qs[K - 1][0, hd, t] @ k for k in keys]) / math.sqrt(D), 0)
    torch.testing.assert_close(out[0, hd, t], sum(wi * vi for wi, vi in zip(w, vals, strict=True)))


def test_linear_soft_ce_gradcheck_fp64_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    import specctl.train.loss as loss_mod

    torch.manual_seed(4)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(torch.randn(7, 6, dtype=torch.float64), -1)
    monkeypatch.setattr(loss_mod, "CHUNK_BYTES", 4 * 6 * 3)  # 3-row chunks
    assert torch.autograd.gradcheck(lambda a, b: linear_soft_ce(a, b, p)[0], (x, w))
    loss, hits = linear_soft_ce(x, w, p)
    logits = x @ w.t()
    torch.testing.assert_close(loss, -(p * torch.log_softmax(logits, -1)).sum())
    assert int(hits) == int((logits.argmax(-1) == p.argmax(-1)).sum())


def test_simulated_al() -> None:
    assert simulated_al([1.0, 1.0]) == 3.0
    assert simulated_al([0.5, 0.5]) == pytest.approx(1.75)
    assert simulated_al([]) == 1.0


@pytest.mark.gpu
def test_ttt_loss_on_cuda_matches_cpu() -> None:
    draft, head_w, t2d = tiny_draft()
    draft = draft.float()
    B, T, K = 2, 9, 4
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.uint8)
    aux, last = torch.randn(B, T, 3 * H), torch.randn(B, T, H)
    cpu = ttt_loss(draft, TargetHead(head_w.float(), t2d), ids, mask, aux, last, ttt_length=K)
    dev = torch.device("cuda")
    gpu = ttt_loss(
        draft.to(dev),
        TargetHead(head_w.float().to(dev), t2d.to(dev)),
        ids.to(dev),
        mask.to(dev),
        aux.to(dev),
        last.to(dev),
        ttt_length=K,
    )
    torch.testing.assert_close(gpu.loss.cpu(), cpu.loss, rtol=1e-3, atol=1e-3)


def test_bf16_head_products_track_fp32() -> None:
    """TargetHead(mm_dtype=bf16): both LM-head products in bf16, softmax and sums in fp32.

    Loss and gradients stay within bf16 rounding of the fp32 ones, and every gradient keeps
    its parameter's fp32 dtype (the optimizer never sees bf16).
    """
    draft, head_w, t2d = tiny_draft()
    draft = draft.float()
    B, T, K = 2, 12, 3
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.uint8)
    aux, last = torch.randn(B, T, 3 * H, generator=g), torch.randn(B, T, H, generator=g)
    params = [p for p in draft.parameters() if p.requires_grad]
    runs = {}
    for name, mm in (("fp32", None), ("bf16", torch.bfloat16)):
        head = TargetHead(head_w.float(), t2d, mm)
        res = ttt_loss(draft, head, ids, mask, aux, last, ttt_length=K)
        runs[name] = (res.loss.detach(), torch.autograd.grad(res.loss, params))
        assert res.loss.dtype == torch.float32
        assert all(gr.dtype == torch.float32 for gr in runs[name][1])
    (lf, gf), (lb, gb) = runs["fp32"], runs["bf16"]
    assert not torch.equal(lf, lb)  # the bf16 path really ran
    torch.testing.assert_close(lb, lf, rtol=2e-2, atol=1e-3)
    flat_f, flat_b = torch.cat([x.flatten() for x in gf]), torch.cat([x.flatten() for x in gb])
    assert torch.nn.functional.cosine_similarity(flat_f, flat_b, dim=0) > 0.99


def test_bf16_products_pad_rows_to_a_few_shapes() -> None:
    """oneDNN compiles a bf16 kernel per shape: rows are padded to multiples of 64 (zeros,
    which add nothing to the weight gradient); fp32 products keep their rows."""
    from specctl.train.loss import pad_rows

    x = torch.randn(70, 8)
    assert pad_rows(x, None) is x and pad_rows(x, torch.float32) is x
    for got in (pad_rows(x, torch.bfloat16), pad_rows(x.bfloat16(), None)):
        assert got.shape == (128, 8) and not got[70:].any()
    assert pad_rows(torch.randn(64, 8), torch.bfloat16).shape == (64, 8)
    # padded or not, the loss and gradients of a bf16 product are the same rows' sums
    w = torch.randn(32, 8, requires_grad=True)
    p = torch.softmax(torch.randn(70, 32), -1)
    xs = x.clone().requires_grad_(True)
    loss, _ = linear_soft_ce(xs, w, p, mm_dtype=torch.bfloat16)
    loss.backward()
    assert xs.grad is not None and xs.grad.shape == (70, 8) and w.grad is not None
    ref = -(p * torch.log_softmax(x @ w.detach().t(), -1)).sum()
    torch.testing.assert_close(loss.detach(), ref, rtol=2e-2, atol=1e-2)
