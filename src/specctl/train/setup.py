"""Building a run: output dir, target facts, vocab mapping, the draft and its optimizer.

The target is read as config.json + the embedding and lm_head tensors of its safetensors
(`load_target_rows`), never as a whole model. The vocab mapping is computed by rank 0 only
(token counts under the loss mask of the first records), its counts broadcast, and every
rank derives the identical mapping from them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specctl.draft.eagle3 import Eagle3Config, Eagle3Draft, load_target_rows
from specctl.draft.vocab import VocabMapping, build_mapping, count_tokens
from specctl.errors import InputError
from specctl.train import parallel
from specctl.train.objective import TargetHead, TTTResult, ttt_loss
from specctl.train.run_config import TrainDraftConfig


class TTTModel(nn.Module):
    """The unit FSDP wraps: one forward = the whole TTT unroll (see parallel.py's traps)."""

    def __init__(self, draft: Eagle3Draft, head: TargetHead, ttt_length: int, decay: float) -> None:
        super().__init__()
        self.draft = draft
        self.head = head  # plain attribute: frozen, fp32, not sharded
        self.ttt_length, self.decay = ttt_length, decay

    def forward(
        self,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        aux: torch.Tensor,
        last_hidden: torch.Tensor,
        denom: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        r = ttt_loss(
            self.draft,
            self.head,
            input_ids,
            loss_mask,
            aux,
            last_hidden,
            self.ttt_length,
            self.decay,
            denom,
        )
        # a tuple, not the dataclass: FSDP2 hooks backward through the tensors it can see
        return r.loss, r.loss_sum, r.hits, r.count, r.valid


def as_result(out: tuple[torch.Tensor, ...]) -> TTTResult:
    return TTTResult(*out)


def prepare_out(path: str) -> Path:
    if not path:
        raise InputError("--out is required", "e.g. --out runs/draft1")
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write to --out {out}: {e.strerror or e}") from None
    return out


def draft_config(cfg: TrainDraftConfig, target_dir: Path) -> Eagle3Config:
    hf = json.loads((target_dir / "config.json").read_text())
    d = cfg.draft
    overrides: dict[str, Any] = {"num_aux": d.num_aux}
    for name in ("intermediate_size", "num_attention_heads", "num_key_value_heads"):
        if getattr(d, name):
            overrides[name] = getattr(d, name)
    if d.num_attention_heads and not d.num_key_value_heads:
        overrides["num_key_value_heads"] = d.num_attention_heads
    try:
        return Eagle3Config.from_target_config(hf, d.draft_vocab_size, **overrides)
    except (KeyError, ValueError) as e:
        raise InputError(f"cannot shape a draft for {target_dir}: {e}") from None


def resolve_vocab(
    cfg: TrainDraftConfig,
    env: parallel.Dist,
    dcfg: Eagle3Config,
    first_samples: Any,
    out: Path,
    ckpt: Path | None,
) -> VocabMapping:
    """Checkpoint's mapping on resume, else --vocab FILE, else counts from rank 0 (broadcast).

    `first_samples()` (rank 0 only) yields (input_ids, loss_mask) pairs to count.
    """
    path = ckpt / "vocab.safetensors" if ckpt else cfg.draft.vocab_file
    if path:
        mapping = VocabMapping.load(path, dcfg.vocab_size, dcfg.draft_vocab_size)
    else:
        counts = torch.zeros(dcfg.vocab_size, dtype=torch.int64)
        if env.is_main and dcfg.draft_vocab_size < dcfg.vocab_size:
            counts = count_tokens(first_samples(), dcfg.vocab_size)
        counts = parallel.broadcast(counts.to(env.device)).cpu()
        mapping = build_mapping(counts, dcfg.draft_vocab_size)
    if env.is_main:
        mapping.save(out / "vocab.safetensors")
    return mapping


def build_model(
    dcfg: Eagle3Config,
    mapping: VocabMapping,
    target_dir: Path,
    cfg: TrainDraftConfig,
    env: parallel.Dist,
) -> TTTModel:
    embed, head = load_target_rows(target_dir)
    if embed.shape != (dcfg.vocab_size, dcfg.hidden_size):
        raise InputError(
            f"target embedding is {tuple(embed.shape)}, config.json says "
            f"{(dcfg.vocab_size, dcfg.hidden_size)}"
        )
    torch.manual_seed(cfg.seed)
    draft = Eagle3Draft(dcfg)
    draft.set_vocab(mapping.d2t, mapping.t2d)
    draft.init_from_target(embed, head)
    draft.to(env.device)
    # bf16 runs compute the target distribution in bf16 too (softmax in fp32): the records
    # are bf16 already, and this matmul over the whole target vocab is not small.
    head_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    target_head = TargetHead(head.to(env.device, head_dtype), mapping.t2d.to(env.device))
    return TTTModel(draft, target_head, cfg.ttt_length, cfg.step_decay)


def build_optimizer(model: nn.Module, cfg: TrainDraftConfig) -> tuple[Any, Any]:
    """AdamW over trainable parameters; linear warm-up then cosine to lr * min_lr_ratio."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=(0.9, 0.95))

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        span = max(1, cfg.max_steps - o.warmup_steps)
        t = min(1.0, (step - o.warmup_steps) / span)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return optim, torch.optim.lr_scheduler.LambdaLR(optim, factor)
