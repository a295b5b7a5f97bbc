"""Draft training throughput: specctl's TTT step vs a naive eager one, as ratios in one run.

Both train the same EAGLE-3 draft (SmolLM2-135M shapes: H=576, 9/3 heads, intermediate
1536, target vocab 49,152) on the same random record (T tokens, every position in the loss
mask, TTT 7), with the same loss (0.8^k-weighted soft cross-entropy against the frozen
target head's distribution over the draft vocab), backward and AdamW step:

- `specctl`: `train.objective.ttt_loss` (step-0 causal SDPA + diagonal terms joined by a
  sentinel key, chunked fused head/loss over the scored rows only, chunked target head);
- `naive`: the reference design (reference/cpu-costs.md §6): per step the keys of all
  steps so far concatenated and a materialised [T, T*(k+1)] mask, explicit GQA expansion
  and softmax, full [T, Vd] logits and full [T, V] target logits.

A second part trains from a directory of random records through the real loop
(`train_draft`, prefetch thread, FSDP2 world of 1) and reports tokens/s and data-wait %.
Timings are interleaved and the best of each kept; compare ratios, not absolute times.

    .venv/bin/python bench/bench_train.py [--quick] [--tokens T]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from specctl.draft.eagle3 import Eagle3Config, Eagle3Draft, apply_rope, rope_cos_sin
from specctl.train.objective import TargetHead, ttt_loss

SMOL = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=1e5,
    vocab_size=49152,
)
K = 7


def naive_loss(
    draft: Eagle3Draft,
    head_w: torch.Tensor,
    t2d: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    aux: torch.Tensor,
    last: torch.Tensor,
) -> torch.Tensor:
    """The eager reference: materialised masks over all steps' keys, full logits."""
    cfg, layer = draft.cfg, draft.midlayer
    att = layer.self_attn
    t = ids.shape[1]
    with torch.no_grad():
        full = last[0] @ head_w.t()  # [T, V]
        target = torch.softmax(full[:, t2d], -1)  # [T, Vd]
        weight = mask[0].float() * t2d[full.argmax(-1)].float()  # [T]
    h = draft.fc(aux)
    keys: list[torch.Tensor] = []
    vals: list[torch.Tensor] = []
    total = torch.zeros(())
    for k in range(K):
        tok = F.pad(ids[:, k + 1 :], (0, k + 1))
        x = torch.cat([layer.input_layernorm(draft.embed_tokens(tok)), layer.hidden_norm(h)], -1)
        cos, sin = rope_cos_sin(torch.arange(t)[None] + k, cfg.head_dim, cfg.rope_theta, x.dtype)
        q = apply_rope(att.q_proj(x).view(1, t, att.nh, att.d).transpose(1, 2), cos, sin)
        kk = apply_rope(att.k_proj(x).view(1, t, att.nkv, att.d).transpose(1, 2), cos, sin)
        keys.append(kk.repeat_interleave(att.nh // att.nkv, 1))
        vals.append(
            att.v_proj(x)
            .view(1, t, att.nkv, att.d)
            .transpose(1, 2)
            .repeat_interleave(att.nh // att.nkv, 1)
        )
        allowed = torch.zeros(t, t * (k + 1), dtype=torch.bool)  # [T, T*(k+1)]
        allowed[:, :t] = torch.ones(t, t, dtype=torch.bool).tril()
        for j in range(1, k + 1):
            allowed[:, j * t : (j + 1) * t] = torch.eye(t, dtype=torch.bool)
        scores = q @ torch.cat(keys, 2).transpose(-1, -2) / math.sqrt(att.d)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        o = (probs @ torch.cat(vals, 2)).transpose(1, 2).reshape(1, t, -1)
        mid = h + att.o_proj(o)
        h = mid + layer.mlp(layer.post_attention_layernorm(mid))
        logq = torch.log_softmax(draft.lm_head(draft.norm(h))[0], -1)  # [T, Vd]
        tgt = F.pad(target[k + 1 :], (0, 0, 0, k + 1))
        w = F.pad(weight[k + 1 :], (0, k + 1))
        total = total + 0.8**k * -((tgt * logq).sum(-1) * w).sum() / mask[0, k + 1 :].sum()
    return total


def _setup(vd: int, t: int, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cfg = Eagle3Config(**SMOL, draft_vocab_size=vd)
    draft = Eagle3Draft(cfg)
    t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    t2d[torch.randperm(cfg.vocab_size, generator=g)[:vd]] = True
    kept = t2d.nonzero().squeeze(1)
    draft.set_vocab(kept - torch.arange(vd), t2d)
    head_w = torch.randn(cfg.vocab_size, 576, generator=g) * 0.05
    head_w[kept] *= 3  # most target argmaxes fall in the draft vocab, as with real data
    mask = torch.ones(1, t, dtype=torch.uint8)
    mask[:, : t // 4] = 0  # the prompt: a quarter of the tokens, outside the loss
    draft.to(dtype)
    return dict(
        draft=draft,
        head_w=head_w.to(dtype),
        t2d=t2d,
        mask=mask,
        ids=torch.randint(0, 49152, (1, t), generator=g),
        aux=torch.randn(1, t, 3 * 576, generator=g).to(dtype),
        last=torch.randn(1, t, 576, generator=g).to(dtype),
        opt=torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-5),
    )


def _loss(s: dict, which: str) -> torch.Tensor:
    if which == "naive":
        return naive_loss(
            s["draft"], s["head_w"], s["t2d"], s["ids"], s["mask"], s["aux"], s["last"]
        )
    return ttt_loss(
        s["draft"], TargetHead(s["head_w"], s["t2d"]), s["ids"], s["mask"], s["aux"], s["last"], K
    ).loss


def _step(s: dict, which: str) -> float:
    t0 = time.perf_counter()
    loss = _loss(s, which)
    loss.backward()
    s["opt"].step()
    s["opt"].zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def bench_step(vd: int, t: int, repeats: int) -> list[dict]:
    """specctl fp32 and bf16 vs naive fp32, interleaved; checks both losses agree first."""
    runs = {
        "naive": _setup(vd, t),
        "specctl": _setup(vd, t),
        "specctl-bf16": _setup(vd, t, torch.bfloat16),
    }
    with torch.no_grad():
        a, b = _loss(runs["naive"], "naive"), _loss(runs["specctl"], "specctl")
    if not torch.allclose(a, b, rtol=1e-3):
        raise AssertionError(f"naive and specctl losses differ: {a.item()} vs {b.item()}")
    best = dict.fromkeys(runs, math.inf)
    for which in runs:  # warm-up
        _step(runs[which], which)
    for _ in range(repeats):
        for which in runs:
            best[which] = min(best[which], _step(runs[which], which))
    return [
        {
            "bench": "train_step",
            "impl": which,
            "draft_vocab": vd,
            "tokens": t,
            "ttt": K,
            "tok_s": t / best[which],
            "naive_tok_s": t / best["naive"],
            "ratio": best["naive"] / best[which],
        }
        for which in ("specctl", "specctl-bf16")
    ]


def bench_loop(vd: int, t: int, steps: int) -> dict:
    """The real loop from a record dir: tokens/s and data-wait % (prefetch overlap)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from specctl.pack import pack_record
    from specctl.train.loop import train_draft
    from specctl.train.run_config import TrainDraftConfig

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf = {k: v for k, v in SMOL.items() if k != "rms_norm_eps"}
        LlamaForCausalLM(
            LlamaConfig(**hf, num_hidden_layers=1, tie_word_embeddings=True)
        ).save_pretrained(root / "target")
        g = torch.Generator().manual_seed(1)
        (root / "recs").mkdir()
        for i in range(steps + 2):
            rec = pack_record(
                epoch=0,
                index=i,
                input_ids=torch.randint(0, 49152, (t,), generator=g),
                loss_mask=torch.ones(t, dtype=torch.uint8),
                aux_hidden=torch.randn(t, 3 * 576, generator=g),
                last_hidden=torch.randn(t, 576, generator=g),
            )
            (root / "recs" / f"0_{i}.rec").write_bytes(rec.numpy().tobytes())
        cfg = TrainDraftConfig(
            target=str(root / "target"),
            out=str(root / "run"),
            from_dir=str(root / "recs"),
            max_steps=steps,
            heldout=0.0,
            save_every=10**6,
            eval_every=10**6,
            log_every=1,
            precision="bf16",
        )
        cfg.draft.draft_vocab_size = vd
        summary = train_draft(cfg)
    return {
        "bench": "train_loop",
        "draft_vocab": vd,
        "tokens": t,
        "ttt": K,
        "steps": steps,
        "tok_s": summary["tokens_per_s"],
        "data_wait_pct": summary["data_wait_pct"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="512 tokens, 1 repeat")
    ap.add_argument("--tokens", type=int, default=0, help="sequence length (default 2048)")
    args = ap.parse_args(argv)
    t = args.tokens or (512 if args.quick else 2048)
    repeats = 1  # after a warm-up; interleaved, so neighbours disturb all three alike
    print(
        f"{'bench':<11} {'impl':<13} {'vocab':>6} {'T':>5} {'tok/s':>8} {'naive tok/s':>12} "
        f"{'ratio':>6} {'data-wait %':>11}",
        flush=True,
    )
    rows: list[dict] = []
    for vd in (8192, 32000):
        rows += _show(bench_step(vd, t, repeats))
    rows += _show([bench_loop(8192, t, 3 if args.quick else 5)])
    return rows


def _show(rows: list[dict]) -> list[dict]:
    for r in rows:
        print(
            f"{r['bench']:<11} {r.get('impl', 'specctl-bf16'):<13} {r['draft_vocab']:>6} "
            f"{r['tokens']:>5} {r['tok_s']:>8.1f} {r.get('naive_tok_s', 0):>12.1f} "
            f"{r.get('ratio', 0):>6.2f} {r.get('data_wait_pct', 0):>11.1f}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
