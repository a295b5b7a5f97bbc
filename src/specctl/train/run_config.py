"""`specctl train-draft` configuration: defaults <- YAML <- --set <- flags (see specctl.config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from specctl.errors import UsageError


@dataclass
class DraftOptions:
    draft_vocab_size: int = 32000  # capped at the target's vocab
    intermediate_size: int = 0  # 0: the target's
    num_attention_heads: int = 0  # 0: the target's
    num_key_value_heads: int = 0  # 0: the target's
    num_aux: int = 3
    vocab_file: str | None = None  # reuse a saved mapping instead of counting tokens
    vocab_records: int = 512  # records counted to build the mapping


@dataclass
class OptimOptions:
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 0.5


@dataclass
class TrainDraftConfig:
    target: str = ""
    out: str = ""
    store: str | None = None
    from_dir: str | None = None
    ttt_length: int = 7
    step_decay: float = 0.8
    batch_size: int = 1  # samples per rank per micro-batch
    grad_accum: int = 1
    max_steps: int = 1000
    epochs: int = 1  # passes over --from-dir
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    seed: int = 0
    max_wait_s: float = 60.0  # store: stop (or fail, if nothing came) after this idle time
    heldout: float = 0.02  # fraction of sample ids held out for evaluation
    max_heldout: int = 64
    eval_every: int = 100
    save_every: int = 100
    log_every: int = 10
    resume: bool = False
    draft: DraftOptions = field(default_factory=DraftOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)

    def __post_init__(self) -> None:
        for name in (
            "ttt_length",
            "batch_size",
            "grad_accum",
            "max_steps",
            "epochs",
            "eval_every",
            "save_every",
            "log_every",
        ):
            value = getattr(self, name)
            if value < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1, got {value}")
        if not 0 <= self.heldout < 1:
            raise UsageError(f"heldout must be in [0, 1), got {self.heldout}")
        if self.max_wait_s < 0:
            raise UsageError(f"max-wait must be >= 0, got {self.max_wait_s}")
        if self.draft.draft_vocab_size < 1:
            raise UsageError(
                f"draft-vocab-size must be at least 1, got {self.draft.draft_vocab_size}"
            )
        if self.optim.lr <= 0:
            raise UsageError(f"lr must be positive, got {self.optim.lr}")
