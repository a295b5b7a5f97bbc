"""The exact tensor set of an EAGLE-3 draft, and the check every export passes before writing.

Engines load drafts by name and silently skip names they do not know (SGLang and vLLM both
iterate the file and look each key up), so a misnamed tensor is not an error there: the
weight just stays at its random init. Hence export validates the full key set, shapes and
dtypes against the config and refuses both missing keys and leftovers.

Names are SGLang's (`midlayer.*`); the speculators format uses `layers.0.*` for the same
tensors (see `rename`).
"""

from __future__ import annotations

from typing import Any

import torch

from specctl.errors import CheckpointError

MIDLAYER = "midlayer."
SPECULATORS_LAYER = "layers.0."
EMBED = "embed_tokens.weight"


def expected_shapes(cfg: Any, *, embed: bool) -> dict[str, tuple[int, ...]]:
    """SGLang-named tensors of a 1-layer EAGLE-3 draft -> shape. `cfg` is an Eagle3Config."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    m = MIDLAYER
    shapes: dict[str, tuple[int, ...]] = {
        "fc.weight": (h, cfg.num_aux * cfg.target_hidden_size),
        f"{m}self_attn.q_proj.weight": (nh * d, 2 * h),
        f"{m}self_attn.k_proj.weight": (nkv * d, 2 * h),
        f"{m}self_attn.v_proj.weight": (nkv * d, 2 * h),
        f"{m}self_attn.o_proj.weight": (h, nh * d),
        f"{m}mlp.gate_proj.weight": (i, h),
        f"{m}mlp.up_proj.weight": (i, h),
        f"{m}mlp.down_proj.weight": (h, i),
        f"{m}input_layernorm.weight": (h,),
        f"{m}hidden_norm.weight": (h,),
        f"{m}post_attention_layernorm.weight": (h,),
        "norm.weight": (h,),
        "lm_head.weight": (cfg.draft_vocab_size, h),
        "d2t": (cfg.draft_vocab_size,),
        "t2d": (cfg.vocab_size,),
    }
    if embed:
        shapes[EMBED] = (cfg.vocab_size, h)
    return shapes


def rename(sd: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """Swap the decoder-layer prefix (`midlayer.` <-> `layers.0.`)."""
    return {(dst + k[len(src) :] if k.startswith(src) else k): v for k, v in sd.items()}


def validate(sd: dict[str, torch.Tensor], cfg: Any, *, embed: bool, where: str = "draft") -> None:
    """Refuse missing keys, leftover keys, wrong shapes, wrong dtypes and a broken vocab map."""
    want = expected_shapes(cfg, embed=embed)
    missing = sorted(set(want) - set(sd))
    leftover = sorted(set(sd) - set(want))
    if missing or leftover:
        parts = [
            f"missing {', '.join(missing)}" if missing else "",
            f"unexpected {', '.join(leftover)}" if leftover else "",
        ]
        raise CheckpointError(
            f"{where}: key set does not match an EAGLE-3 draft: "
            + "; ".join(p for p in parts if p),
            "engines skip unknown keys silently, so export refuses them",
        )
    bad = [f"{k} {tuple(sd[k].shape)} != {want[k]}" for k in want if tuple(sd[k].shape) != want[k]]
    if bad:
        raise CheckpointError(f"{where}: wrong shapes: {'; '.join(bad)}")
    if sd["d2t"].dtype != torch.int64 or sd["t2d"].dtype != torch.bool:
        raise CheckpointError(
            f"{where}: d2t must be int64 and t2d bool (got {sd['d2t'].dtype}, {sd['t2d'].dtype})"
        )
    floats = [k for k in want if k not in ("d2t", "t2d") and not sd[k].is_floating_point()]
    if floats:
        raise CheckpointError(f"{where}: non-float weights: {', '.join(floats)}")
    check_vocab_map(sd["d2t"], sd["t2d"], where)


def check_vocab_map(d2t: torch.Tensor, t2d: torch.Tensor, where: str = "draft") -> None:
    """d2t are offsets (target = draft + d2t[draft]) onto exactly the ids t2d marks, increasing."""
    targets = torch.arange(d2t.numel()) + d2t
    if int(targets.min()) < 0 or int(targets.max()) >= t2d.numel():
        raise CheckpointError(f"{where}: d2t maps outside the target vocab (d2t must hold offsets)")
    if not torch.equal(targets, t2d.nonzero().flatten()):
        raise CheckpointError(
            f"{where}: d2t and t2d disagree (draft ids must be the t2d ids in order)"
        )
