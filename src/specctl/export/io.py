"""Read any draft directory (specctl checkpoint, SGLang, speculators, hf, vLLM MLP) into one form.

Every reader returns SGLang tensor names (`midlayer.*`, the names `Eagle3Draft` uses), so
export, import and eval-accept share one loader. A directory holds `config.json` and
`model.safetensors` (or sharded `model-*.safetensors`). Drafts without `embed_tokens.weight`
(SGLang / speculators exports) get the target's embedding at load time, as the engines do.
MLP speculator drafts (`family == "mlp"`) come back in vLLM's names (`export.mlp`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from specctl.errors import CheckpointError, InputError
from specctl.export import layout, mlp
from specctl.export.formats import config_kind, parse_config

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TRAINER_WEIGHTS = "draft.safetensors"  # train-draft checkpoints (train/checkpoint.py)


@dataclass
class DraftFiles:
    cfg: Any  # Eagle3Config, or MLPSpeculatorConfig when family == "mlp"
    state: dict[str, torch.Tensor]  # SGLang names (mlp: vLLM names, tied slots once)
    kind: str  # "specctl" | "sglang" | "speculators" | "vllm" (mlp)
    aux_layers: list[int] | None = None  # 0-based decoder layer ids; None = the default
    meta: dict[str, Any] = field(default_factory=dict)  # the raw config.json
    family: str = "eagle3"  # "eagle3" | "mlp"


def resolve_dir(path: Path) -> Path:
    """A draft dir, a train-draft checkpoint dir, or a train-draft run dir (its `latest`)."""
    path = Path(path)
    weights = [TRAINER_WEIGHTS, WEIGHTS, "model-00001-of-*.safetensors"]
    if not any(any(path.glob(w)) for w in weights) and (path / "latest").exists():
        path = (path / "latest").resolve()
    if not (path / CONFIG).is_file():
        raise CheckpointError(
            f"{path} is not a draft directory (no {CONFIG}) nor a train-draft run",
            "pass a train-draft checkpoint or an exported dir",
        )
    return path


def _read_config(root: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((root / CONFIG).read_text()))
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"cannot read {root / CONFIG}: {e}") from None


def family_of(path: Path | str) -> str:
    """The draft family, eagle3 or mlp, from config.json alone (before any model loads)."""
    meta = _read_config(resolve_dir(Path(path)))
    return mlp.FAMILY if mlp.is_mlp_config(meta) else "eagle3"


def read_draft_dir(path: Path | str) -> DraftFiles:
    root = resolve_dir(Path(path))
    meta = _read_config(root)
    if (root / TRAINER_WEIGHTS).is_file():
        if mlp.draft_family(meta) == mlp.FAMILY:
            return _read_mlp_checkpoint(root, meta)
        return _read_trainer_checkpoint(root, meta)
    if mlp.is_mlp_config(meta):
        cfg = mlp.parse_config(meta)
        kind = "specctl" if mlp.draft_family(meta) == mlp.FAMILY else "vllm"
        state = mlp.canonical(_read_weights(root), cfg, str(root))
        return DraftFiles(cfg=cfg, state=state, kind=kind, meta=meta, family=mlp.FAMILY)
    cfg, aux = parse_config(meta)
    state = _read_weights(root)
    kind = config_kind(meta)
    if kind == "speculators":
        state = layout.rename(state, layout.SPECULATORS_LAYER, layout.MIDLAYER)
    return DraftFiles(cfg=cfg, state=state, kind=kind, aux_layers=aux, meta=meta)


def _read_trainer_checkpoint(root: Path, run: dict[str, Any]) -> DraftFiles:
    """train-draft's layout (train/checkpoint.py): the draft shape comes from run config + target."""
    from safetensors.torch import load_file

    from specctl.config import from_dict
    from specctl.draft.eagle3 import Eagle3Config
    from specctl.target.models import resolve_model
    from specctl.train.run_config import TrainDraftConfig
    from specctl.train.setup import draft_config

    cfg = from_dict(TrainDraftConfig, run)
    target_dir = resolve_model(cfg.target)
    layers = json.loads((target_dir / CONFIG).read_text()).get("num_hidden_layers")
    meta = {**run, "target_model": str(target_dir), "target_num_layers": layers}
    dcfg, state = draft_config(cfg, target_dir), load_file(str(root / TRAINER_WEIGHTS))
    if isinstance(dcfg, Eagle3Config) and cfg.draft.draft_vocab_size == "auto":
        # the run config keeps "auto"; the size the trainer chose is in the weights
        dcfg.draft_vocab_size = int(state["d2t"].shape[0])
    return DraftFiles(
        cfg=dcfg,
        state=state,
        kind="specctl",
        aux_layers=None,
        meta=meta,
    )


def _read_mlp_checkpoint(root: Path, run: dict[str, Any]) -> DraftFiles:
    """train-draft --draft mlp: shape from the run config + target, weights in vLLM names."""
    from safetensors.torch import load_file

    from specctl.config import from_dict
    from specctl.target.models import resolve_model
    from specctl.train.mlp_setup import mlp_config
    from specctl.train.run_config import TrainDraftConfig

    run_cfg = from_dict(TrainDraftConfig, run)
    target_dir = resolve_model(run_cfg.target)
    cfg = mlp_config(run_cfg, target_dir)
    state = mlp.canonical(load_file(str(root / TRAINER_WEIGHTS)), cfg, str(root))
    meta = {**run, "target_model": str(target_dir)}
    return DraftFiles(cfg=cfg, state=state, kind="specctl", meta=meta, family=mlp.FAMILY)


def _read_weights(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = (
        [root / WEIGHTS] if (root / WEIGHTS).is_file() else sorted(root.glob("model-*.safetensors"))
    )
    if not files:
        raise CheckpointError(f"no {WEIGHTS} in {root}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_draft(files: DraftFiles, embed: torch.Tensor | None = None) -> Any:
    """An eval-mode `Eagle3Draft` (fp32); `embed` [V, H] fills a missing embedding."""
    from specctl.draft.eagle3 import Eagle3Draft

    state = dict(files.state)
    if layout.EMBED not in state:
        if embed is None:
            raise CheckpointError(
                "the draft has no embed_tokens.weight",
                "pass the target model so its embedding can be used",
            )
        state[layout.EMBED] = embed
    layout.validate(state, files.cfg, embed=True)
    draft = Eagle3Draft(files.cfg)
    draft.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True
    )
    return draft.eval()


def write_dir(out: Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """config.json + model.safetensors into a new directory (refuses a non-empty one)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(
            f"output directory {out} exists and is not empty", "choose a new directory"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # read-only or missing mount: a user mistake, not a crash
        raise InputError(f"cannot create output directory {out}: {e.strerror}") from None
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS), metadata={"format": "pt"}
    )
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
