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

from specctl.draft.eagle3 import Eagle3Config, Eagle3Draft, load_target_norm, load_target_rows
from specctl.draft.mlp import MLPSpeculatorConfig
from specctl.draft.vocab import (
    VocabMapping,
    build_mapping,
    choose_vocab_size,
    count_tokens_split,
    coverage_curve,
)
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


def draft_config(cfg: TrainDraftConfig, target_dir: Path) -> Eagle3Config | MLPSpeculatorConfig:
    """The draft's shape for the run's family (`draft_family`: eagle3 or mlp)."""
    if cfg.draft_family == "mlp":
        from specctl.train.mlp_setup import mlp_config

        return mlp_config(cfg, target_dir)
    hf = json.loads((target_dir / "config.json").read_text())
    d = cfg.draft
    overrides: dict[str, Any] = {"num_aux": d.num_aux}
    for name in ("intermediate_size", "num_attention_heads", "num_key_value_heads"):
        if getattr(d, name):
            overrides[name] = getattr(d, name)
    if d.num_attention_heads and not d.num_key_value_heads:
        overrides["num_key_value_heads"] = d.num_attention_heads
    # "auto": a placeholder until `resolve_vocab` has counted tokens and chosen the size
    size = None if d.draft_vocab_size == "auto" else d.draft_vocab_size
    try:
        return Eagle3Config.from_target_config(hf, size, **overrides)
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

    `first_samples()` (rank 0 only) yields (input_ids, loss_mask) pairs to count; with
    `--vocab-from DIR...` those dirs are counted instead (a diverse set, not the training
    answers). `--draft-vocab-size auto` sizes the vocab by the cost model; `dcfg` is updated
    to the mapping's size. `mapping.info` carries the coverage figures for the summary.
    """
    auto = cfg.draft.draft_vocab_size == "auto"
    path = ckpt / "vocab.safetensors" if ckpt else cfg.draft.vocab_file
    if path:
        mapping = VocabMapping.load(path, dcfg.vocab_size, None if auto else dcfg.draft_vocab_size)
        mapping.info = {"vocab_source": "file"}
    else:
        # two halves (alternate samples): rank on one, measure coverage on the other
        halves = torch.zeros(2, dcfg.vocab_size, dtype=torch.int64)
        if env.is_main and (auto or dcfg.draft_vocab_size < dcfg.vocab_size):
            halves = count_tokens_split(_vocab_samples(cfg, first_samples), dcfg.vocab_size, 2)
        halves = parallel.broadcast(halves.to(env.device)).cpu()
        counts = halves.sum(0)
        k = min(cfg.ttt_length, 4)  # chains of k<=4 verify at the cheap q=5
        best, table = choose_vocab_size(halves[0], k, cfg.draft.vocab_accept, halves[1])
        mapping = build_mapping(counts, best if auto else dcfg.draft_vocab_size)
        mapping.info = {
            "vocab_source": "vocab-from" if cfg.draft.vocab_from else "training records",
            "vocab_tokens_counted": int(counts.sum()),
        }
        if int(counts.sum()):  # coverage (held-out half) + model speed-up per candidate size
            mapping.info["vocab_candidates"] = table
            n = mapping.draft_vocab_size  # in-sample coverage is 1.0 past the distinct ids seen
            mapping.info["vocab_coverage_split"] = coverage_curve(halves[0], [n], halves[1])[n]
    dcfg.draft_vocab_size = mapping.draft_vocab_size
    if env.is_main:
        mapping.save(out / "vocab.safetensors")
    return mapping


def _vocab_samples(cfg: TrainDraftConfig, first_samples: Any) -> Any:
    """(input_ids, loss_mask) pairs to count: every record of --vocab-from, else the training ones."""
    if not cfg.draft.vocab_from:
        from specctl.console import log

        log("draft vocab from the training records only (give --vocab-from for a diverse set)")
        yield from first_samples()
        return
    from specctl.train.data import read_record

    for d in cfg.draft.vocab_from:
        files = sorted(Path(d).glob("*.rec"))
        if not files:
            raise InputError(f"--vocab-from {d}: no *.rec files", "produce them with serve-target")
        for f in files:
            r = read_record(f)
            yield r.input_ids, r.loss_mask


def build_model(
    dcfg: Eagle3Config,
    mapping: VocabMapping,
    target_dir: Path,
    cfg: TrainDraftConfig,
    env: parallel.Dist,
) -> TTTModel:
    embed, head = load_target_rows(target_dir)
    final_norm = load_target_norm(target_dir) if cfg.draft.init_norm else None
    if embed.shape != (dcfg.vocab_size, dcfg.hidden_size):
        raise InputError(
            f"target embedding is {tuple(embed.shape)}, config.json says "
            f"{(dcfg.vocab_size, dcfg.hidden_size)}"
        )
    torch.manual_seed(cfg.seed)
    draft = Eagle3Draft(dcfg)
    draft.set_vocab(mapping.d2t, mapping.t2d)
    draft.init_from_target(embed, head, final_norm)
    if cfg.draft.init_lens:
        draft.init_logit_lens()
    draft.lm_head.weight.requires_grad_(not cfg.draft.freeze_head)
    draft.to(env.device)
    # bf16 runs compute the target distribution in bf16 too (softmax in fp32): the records
    # are bf16 already, and this matmul over the whole target vocab is not small.
    head_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    mm_dtype, mm_info = head_matmul(cfg, env, head)
    target_head = TargetHead(
        head.to(env.device, head_dtype), mapping.t2d.to(env.device), mm_dtype, mm_info
    )
    return TTTModel(draft, target_head, cfg.ttt_length, cfg.step_decay)


def head_matmul(
    cfg: TrainDraftConfig, env: parallel.Dist, head: torch.Tensor
) -> tuple[Any, dict[str, Any]]:
    """(`TargetHead.mm_dtype`, what was chosen and why): --set head_matmul; auto on CPU times
    up to 8192 rows of the real head (`specctl.precision.matmul_dtype`) on rank 0, and every
    rank takes rank 0's choice, so ranks never train in different dtypes."""
    from specctl import precision
    from specctl.console import log

    if cfg.precision == "bf16":  # the weights are bf16 already
        return None, {"dtype": "bf16 (--precision)"}
    dtype, info = precision.matmul_dtype(
        cfg.head_matmul, env.device.type, head.shape[1], min(head.shape[0], 8192)
    )
    if env.world > 1:
        info = parallel.broadcast_object(info)  # rank 0's choice for every rank
        dtype = torch.bfloat16 if info["dtype"] == "bf16" else None
    if env.is_main and "fp32_ms" in info:
        log(
            f"LM-head products in {info['dtype']} (timed {info['fp32_ms']} ms fp32 vs "
            f"{info['bf16_ms']} ms bf16)"
        )
    return dtype, info


def build_optimizer(model: nn.Module, cfg: TrainDraftConfig) -> tuple[Any, Any]:
    """AdamW over trainable parameters; linear warm-up then cosine to lr * min_lr_ratio.

    Weight decay applies to matrices only: decaying RMSNorm gains or biases would pull them
    towards 0, not regularise.
    """
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optim = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=(0.9, 0.95))

    def factor(step: int) -> float:
        return lr_factor(step, o.warmup_steps, cfg.max_steps, o.min_lr_ratio)

    return optim, torch.optim.lr_scheduler.LambdaLR(optim, factor)


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """LR multiplier after `step` optimizer steps: linear warm-up, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, max_steps - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
