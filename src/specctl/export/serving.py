"""`specctl export`: a checkpoint -> a serving directory, and an EAGLE-3 directory -> a checkpoint.

Layouts (details and sources in docs/export.md):
- `sglang` / `vllm`: the SGLang / SpecForge `LlamaForCausalLMEagle3` directory, which vLLM
  loads too; `embed_tokens` is left out (both engines use the target's).
- `speculators`: vLLM's speculators format (`layers.0.*` names, nested config).
- `hf`: the SGLang layout plus `embed_tokens.weight`: self-contained, no target needed to load.
MLP speculator drafts (`--draft mlp`) have one layout, vLLM's `MLPSpeculatorPreTrainedModel`
(`--to vllm`; `export.mlp`). Every output is validated before writing and re-read and compared
after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from specctl.errors import CheckpointError, UsageError
from specctl.export import layout, mlp
from specctl.export.formats import DTYPE_NAMES, sglang_config, speculators_config
from specctl.export.io import DraftFiles, read_draft_dir, write_dir

LAYOUTS = ("sglang", "vllm", "speculators", "hf")


def export_draft(
    ckpt: Path,
    to: str | None,
    out: Path,
    *,
    verifier: str | None = None,
    speculative_tokens: int = 4,
) -> dict[str, Any]:
    """Write `ckpt` as layout `to` into `out`; returns a summary for the JSON line.

    `to` None: the family's default layout (EAGLE-3: sglang, MLP speculator: vllm).
    """
    if to is not None and to not in LAYOUTS:
        raise UsageError(f"unknown export layout {to!r}", f"one of: {', '.join(LAYOUTS)}")
    if speculative_tokens < 1:
        raise UsageError(f"--k must be at least 1, got {speculative_tokens}")
    src = read_draft_dir(ckpt)
    if src.family == mlp.FAMILY:
        return _export_mlp(src, ckpt, to or "vllm", out)
    to = to or "sglang"
    cfg, state = src.cfg, dict(src.state)
    embed = to == "hf"
    if embed and layout.EMBED not in state:
        raise CheckpointError(
            f"{ckpt} has no embed_tokens.weight: cannot write a self-contained hf dir",
            "export --to sglang instead (engines use the target's)",
        )
    if not embed:
        state.pop(layout.EMBED, None)
    layout.validate(state, cfg, embed=embed, where=str(ckpt))
    dtype = DTYPE_NAMES[str(state["lm_head.weight"].dtype)]
    if to == "speculators":
        config = speculators_config(
            cfg,
            dtype,
            **_verifier_fields(src, verifier),
            speculative_tokens=speculative_tokens,
            aux_hf_ids=_vllm_aux_ids(src.aux_layers),
        )
    else:
        config = sglang_config(cfg, dtype)
        if _nondefault_aux(src):
            raise CheckpointError(
                f"the draft was trained on non-default aux layers {src.aux_layers}; "
                "the SGLang layout cannot carry them unambiguously",
                "export --to speculators (vLLM convention)",
            )
    names = (
        layout.rename(state, layout.MIDLAYER, layout.SPECULATORS_LAYER)
        if to == "speculators"
        else state
    )
    write_dir(out, config, names)
    _check_roundtrip(out, cfg, state)
    return {
        "out": str(out),
        "layout": to,
        "tensors": len(state),
        "dtype": dtype,
        "draft_vocab_size": cfg.draft_vocab_size,
        "vocab_size": cfg.vocab_size,
    }


def import_eagle3(src_dir: Path, out: Path, *, embed: torch.Tensor | None = None) -> dict[str, Any]:
    """An SGLang / SpecForge / speculators EAGLE-3 dir -> a specctl checkpoint dir (warm start)."""
    src = read_draft_dir(src_dir)
    if src.family == mlp.FAMILY:
        raise UsageError(
            f"{src_dir} is an MLP speculator, not EAGLE-3", "use --from-mlp-speculator"
        )
    if src.kind == "specctl":
        raise UsageError(f"{src_dir} is already a specctl checkpoint")
    state = dict(src.state)
    if layout.EMBED not in state and embed is not None:
        state[layout.EMBED] = embed.to(state["lm_head.weight"].dtype)
    layout.validate(state, src.cfg, embed=layout.EMBED in state, where=str(src_dir))
    config = {**src.cfg.to_dict(), "aux_layers": src.aux_layers, "imported_from": src.kind}
    write_dir(out, config, state)
    _check_roundtrip(out, src.cfg, state)
    return {
        "out": str(out),
        "imported_from": src.kind,
        "tensors": len(state),
        "draft_vocab_size": src.cfg.draft_vocab_size,
        "has_embed": layout.EMBED in state,
    }


def import_mlp(src_dir: Path, out: Path) -> dict[str, Any]:
    """A vLLM / fms-extras `MLPSpeculatorPreTrainedModel` dir -> a specctl MLP draft dir."""
    src = read_draft_dir(src_dir)
    if src.family != mlp.FAMILY:
        raise UsageError(f"{src_dir} is not an MLP speculator", "use --from-eagle3")
    if src.kind == "specctl":
        raise UsageError(f"{src_dir} is already a specctl draft")
    mlp.validate(src.state, src.cfg, str(src_dir))
    config = {"draft_family": mlp.FAMILY, **src.cfg.to_dict(), "imported_from": src.kind}
    write_dir(out, config, src.state)
    _check_mlp_roundtrip(out, src.cfg, src.state)
    return {
        "out": str(out),
        "imported_from": src.kind,
        "family": mlp.FAMILY,
        "tensors": len(src.state),
        "n_predict": src.cfg.n_predict,
    }


def _export_mlp(src: DraftFiles, ckpt: Path, to: str, out: Path) -> dict[str, Any]:
    """An MLP speculator -> vLLM's `MLPSpeculatorPreTrainedModel` dir (its only serving layout)."""
    if to != "vllm":
        raise UsageError(
            f"--to {to} has no MLP speculator layout: export MLP drafts with --to vllm",
            "SGLang has no MLP speculator loader; speculators and hf are EAGLE-3 layouts",
        )
    state = dict(src.state)
    mlp.validate(state, src.cfg, str(ckpt))
    dtype = DTYPE_NAMES[str(state["head.0.weight"].dtype)]
    write_dir(out, mlp.vllm_config(src.cfg, dtype), state)
    _check_mlp_roundtrip(out, src.cfg, state)
    return {
        "out": str(out),
        "layout": to,
        "family": mlp.FAMILY,
        "tensors": len(state),
        "dtype": dtype,
        "n_predict": src.cfg.n_predict,
        "vocab_size": src.cfg.vocab_size,
    }


def _check_mlp_roundtrip(out: Path, cfg: Any, state: dict[str, torch.Tensor]) -> None:
    back = read_draft_dir(out)
    if back.family != mlp.FAMILY or back.cfg != cfg:
        raise CheckpointError(f"re-reading {out} gave a different config: {back.cfg} != {cfg}")
    mlp.validate(back.state, back.cfg, str(out))
    for k, v in state.items():
        if not torch.equal(back.state[k], v):
            raise CheckpointError(f"re-reading {out}: tensor {k} differs from the checkpoint")


def _verifier_fields(src: DraftFiles, verifier: str | None) -> dict[str, str]:
    """speculators needs verifier.name_or_path: the --model flag or the checkpoint's target."""
    name = verifier or src.meta.get("target_model")
    if not name:
        raise UsageError(
            "--to speculators needs the target model (vLLM reads "
            "speculators_config.verifier.name_or_path)",
            "pass --model PATH",
        )
    from specctl.target.models import resolve_model

    path = resolve_model(str(name))
    import json

    arch = json.loads((path / "config.json").read_text()).get("architectures", ["LlamaForCausalLM"])
    return {"verifier": str(path.resolve()), "verifier_arch": arch[0]}


def _vllm_aux_ids(aux: list[int] | None) -> list[int] | None:
    """0-based decoder layer ids -> vLLM's HF hidden_states indices (+1); None = default."""
    return None if aux is None else [i + 1 for i in aux]


def _nondefault_aux(src: DraftFiles) -> bool:
    """True when the checkpoint says it was trained on aux layers other than the default."""
    n = src.meta.get("target_num_layers")
    if src.aux_layers is None or n is None:
        return False
    from specctl.target.engines import default_aux_layers

    return list(src.aux_layers) != default_aux_layers(int(n))


def _check_roundtrip(out: Path, cfg: Any, state: dict[str, torch.Tensor]) -> None:
    """Re-read what was written: same config, same tensors (validated by reloading)."""
    back = read_draft_dir(out)
    if back.cfg != cfg:
        raise CheckpointError(f"re-reading {out} gave a different config: {back.cfg} != {cfg}")
    layout.validate(back.state, back.cfg, embed=layout.EMBED in state, where=str(out))
    for k, v in state.items():
        if not torch.equal(back.state[k], v):
            raise CheckpointError(f"re-reading {out}: tensor {k} differs from the checkpoint")
