"""Building a `--draft mlp` run: the speculator's shape, its (full) vocab file, the model.

The speculator predicts over the target's whole vocabulary (vLLM's `MLPSpeculator` has no
draft-vocab mapping), so the run's `vocab.safetensors` is the identity mapping: it keeps the
checkpoint layout of train/checkpoint.py identical for both families.

Init: fms-extras' N(0, 1/sqrt(D)) for every embedding and linear, all trainable. With
`--set mlp.init_from_target=true` (inner_dim == H only) every `emb[i]` starts as the
target's embedding and every `head[i]` as its lm_head. Measured on SmolLM2 chatterbot
records (batch 4, lr 1e-3): that start has a summed 3-head loss of 78 against 33 for the
random init (the lm_head rows on post-GELU states give sharp, wrong logits) and was still
behind after 12 steps; copying only the embedding matched the random init. So random is
the default.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from specctl.draft.eagle3 import load_target_rows
from specctl.draft.mlp import MLPSpeculator, MLPSpeculatorConfig
from specctl.draft.vocab import VocabMapping, build_mapping
from specctl.errors import InputError
from specctl.train import parallel
from specctl.train.mlp_objective import MLPModel
from specctl.train.objective import TargetHead
from specctl.train.run_config import TrainDraftConfig
from specctl.train.setup import head_matmul


def mlp_config(cfg: TrainDraftConfig, target_dir: Path) -> MLPSpeculatorConfig:
    hf = json.loads((target_dir / "config.json").read_text())
    d = cfg.draft
    try:
        return MLPSpeculatorConfig.from_target_config(
            hf,
            inner_dim=d.inner_dim,
            n_predict=cfg.n_predict,
            tie_weights=d.tie_weights,
            scale_input=d.scale_input,
        )
    except (KeyError, ValueError) as e:
        raise InputError(f"cannot shape an MLP speculator for {target_dir}: {e}") from None


def full_vocab(dcfg: MLPSpeculatorConfig, env: parallel.Dist, out: Path) -> VocabMapping:
    """The identity mapping over the target vocab, saved as the run's vocab.safetensors.

    Nothing is counted: `counts` are ones, so the reported coverage is 1.0 (every token).
    """
    counts = torch.ones(dcfg.vocab_size, dtype=torch.int64)
    mapping = build_mapping(counts, dcfg.vocab_size)
    if env.is_main:
        mapping.save(out / "vocab.safetensors")
    return mapping


def build_mlp_model(
    dcfg: MLPSpeculatorConfig, target_dir: Path, cfg: TrainDraftConfig, env: parallel.Dist
) -> MLPModel:
    embed, head = load_target_rows(target_dir)
    if embed.shape != (dcfg.vocab_size, dcfg.emb_dim):
        raise InputError(
            f"target embedding is {tuple(embed.shape)}, config.json says "
            f"{(dcfg.vocab_size, dcfg.emb_dim)}"
        )
    torch.manual_seed(cfg.seed)
    draft = MLPSpeculator(dcfg)
    if cfg.mlp.init_from_target:
        draft.init_from_target(embed, head)
    draft.to(env.device)
    head_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    all_rows = torch.ones(dcfg.vocab_size, dtype=torch.bool, device=env.device)
    mm_dtype, mm_info = head_matmul(cfg, env, head)
    target_head = TargetHead(head.to(env.device, head_dtype), all_rows, mm_dtype, mm_info)
    return MLPModel(draft, target_head, cfg.step_weights())
