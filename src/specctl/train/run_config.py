"""`specctl train-draft` configuration: defaults <- YAML <- --set <- flags (see specctl.config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from specctl.errors import UsageError


@dataclass
class DraftOptions:
    # "auto": the cost model picks it from the token coverage (draft/vocab.py choose_vocab_size)
    draft_vocab_size: int | Literal["auto"] = 32000  # capped at the target's vocab
    intermediate_size: int = 0  # 0: the target's
    num_attention_heads: int = 0  # 0: the target's
    num_key_value_heads: int = 0  # 0: the target's
    num_aux: int = 3
    vocab_file: str | None = None  # reuse a saved mapping instead of counting tokens
    vocab_records: int = 512  # records counted to build the mapping
    # record dirs whose loss-masked (target-written) tokens choose the vocab; several sources
    # of prompts (not only the training answers). Empty: count the training records.
    vocab_from: list[str] = field(default_factory=list)
    vocab_accept: float = 0.7  # cost model: assumed acceptance of in-vocab tokens (auto size)
    freeze_head: bool = False  # ablation: keep lm_head at the target's rows
    # start `norm` from the target's final norm: exact target head at step 0, yet held-out AL
    # came out ~0.01 lower than all-ones on SmolLM2 (2 seeds; sharper wrong logits early)
    init_norm: bool = False
    # start as the logit lens of the deepest aux layer (fc = identity on it, residual branches
    # zero): faster first steps, but not better held-out AL in our runs -> opt-in
    init_lens: bool = False
    # --draft mlp only (draft/mlp.py): head width (0: the target's H), vLLM's tying, ln0 on input
    inner_dim: int = 0
    tie_weights: bool = False
    scale_input: bool = False


@dataclass
class MLPOptions:
    """--draft mlp: per-head loss weights (None: 1.0 each, as IBM's speculator recipe sums them)."""

    head_weights: list[float] | None = None
    # emb/head from the target's embedding/lm_head (inner_dim == H only). Off by default:
    # on SmolLM2 it started at 3x the loss of fms-extras' random init and stayed behind.
    init_from_target: bool = False


@dataclass
class OptimOptions:
    # 1e-3: on SmolLM2 records 1e-4 left MT-Bench held-out acc_0 at ~0.02 after 45 steps of 8
    # samples, 1e-3 reached ~0.09 (a 1-layer draft; warm-up + cosine keep long runs stable)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 20
    weight_decay: float = 0.01  # AdamW, matrices only (setup.build_optimizer)
    grad_clip: float = 0.5


@dataclass
class TrainDraftConfig:
    target: str = ""
    out: str = ""
    store: str | None = None
    from_dir: str | None = None
    draft_family: Literal["eagle3", "mlp"] = "eagle3"
    init_from: str | None = None  # warm start: draft weights of this checkpoint, fresh optimizer
    ttt_length: int = 7
    n_predict: int = 3  # --draft mlp: number of heads (tokens proposed per step)
    step_decay: float = 0.8
    batch_size: int = 1  # samples per rank per micro-batch
    grad_accum: int = 1
    max_steps: int = 1000
    epochs: int = 1  # passes over --from-dir
    precision: Literal["fp32", "bf16"] = "fp32"
    # dtype of the LM-head products (draft head loss/grads, target distribution), most of a
    # CPU step: auto = bf16 where timed faster at start (CPU), else the weights' dtype
    head_matmul: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    seed: int = 0
    max_wait_s: float = 60.0  # store: stop (or fail, if nothing came) after this idle time
    # store: while no fresh record is ready, train again on a micro-batch already trained
    # (each up to `replay` more times, once `replay_gap` later samples were trained; the
    # spool, per rank, keeps at most `replay_mb` MiB). 0: off (replay.py)
    replay: int = 0
    replay_gap: int = 128
    replay_mb: int = 1024
    heldout: float = 0.02  # fraction of sample ids held out for evaluation
    max_heldout: int = 64
    # held-out set from a different prompt source (record dir): picks `best`, early stopping
    eval_from: str | None = None
    max_eval: int = 64  # records of --eval-from used
    patience: int = 0  # stop after this many evals without a better held-out AL (0: never)
    eval_every: int = 100
    save_every: int = 100
    log_every: int = 10
    resume: bool = False
    draft: DraftOptions = field(default_factory=DraftOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    mlp: MLPOptions = field(default_factory=MLPOptions)

    def __post_init__(self) -> None:
        for name in (
            "ttt_length",
            "n_predict",
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
        if min(self.replay, self.replay_gap, self.replay_mb) < 0:
            raise UsageError("replay, replay_gap and replay_mb must be >= 0")
        if self.max_wait_s < 0:
            raise UsageError(f"max-wait must be >= 0, got {self.max_wait_s}")
        if self.draft.draft_vocab_size != "auto" and self.draft.draft_vocab_size < 1:
            raise UsageError(
                f"draft-vocab-size must be at least 1, got {self.draft.draft_vocab_size}"
            )
        if self.optim.lr <= 0:
            raise UsageError(f"lr must be positive, got {self.optim.lr}")
        if self.patience < 0 or self.max_eval < 1:
            raise UsageError("patience must be >= 0 and max-eval at least 1")
        if not 0 < self.draft.vocab_accept <= 1:
            raise UsageError(f"draft.vocab_accept must be in (0, 1], got {self.draft.vocab_accept}")
        hw = self.mlp.head_weights
        if hw is not None and (len(hw) != self.n_predict or min(hw) < 0 or sum(hw) <= 0):
            raise UsageError(
                f"mlp.head_weights needs {self.n_predict} non-negative weights (one per head), "
                f"got {hw}"
            )
        if self.draft_family == "mlp" and self.draft.tie_weights and self.n_predict < 2:
            raise UsageError("draft.tie_weights needs --n-predict of at least 2")

    def step_weights(self) -> list[float]:
        """Loss weight of each scored step: TTT steps (decay^k) or MLP heads."""
        if self.draft_family == "mlp":
            return list(self.mlp.head_weights or [1.0] * self.n_predict)
        return [self.step_decay**k for k in range(self.ttt_length)]
