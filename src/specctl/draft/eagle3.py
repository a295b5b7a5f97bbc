"""The EAGLE-3 draft model: `fc` over the target's aux states, one decoder layer, a pruned LM head.

A plain `nn.Module` (no process groups here: `train/parallel.py` shards it from outside).
Parameter and buffer names are exactly the SGLang / SpecForge export names (`fc.weight`,
`midlayer.self_attn.q_proj.weight`, ..., `norm.weight`, `lm_head.weight`, `d2t`, `t2d`,
`embed_tokens.weight`), so exporting is a filter over `state_dict()`, never a rename.

Forward semantics shared with the serving engines (reference/export-clients.md Q2 item 7):
- `fc` input is the k aux states concatenated low -> high layer, bias-free;
- first layer input = cat([input_layernorm(embed(tok)), hidden_norm(h)], -1): embeddings first;
- the residual is the un-normalised `h`; logits = lm_head(norm(h_out));
- the hidden fed to the next draft step is the pre-norm `h_out`.
Row t pairs aux state g_t with token x_{t+1} and sits at RoPE position t; the draft step k
after it sits at position t+k.

Attention goes through a small `attend(layer, q, k, v)` object so the same layer code serves
incremental decoding (`DraftCache`) and training (the TTT attention in `train/objective.py`).

Traps: RoPE here is the plain Llama rotation with the target's `rope_theta` (llama3/yarn
scaling is not applied: fine for drafts at ordinary context lengths); SmolLM2 ties its
lm_head to the embedding, so `load_target_rows` falls back to the embedding when the
checkpoint has no `lm_head.weight`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from specctl.skinny import linear


@dataclass
class Eagle3Config:
    """Draft shape; `vocab_size` is the target's vocabulary, `draft_vocab_size` the pruned head."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_layers: int = 1
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    vocab_size: int = 32000
    draft_vocab_size: int = 32000
    target_hidden_size: int = 0  # 0 -> hidden_size
    num_aux: int = 3

    def __post_init__(self) -> None:
        if self.target_hidden_size == 0:
            self.target_hidden_size = self.hidden_size
        if self.num_layers != 1:
            raise ValueError("only num_layers=1 is supported (the SGLang/vLLM EAGLE-3 layout)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size must be in 1..{self.vocab_size}")

    @classmethod
    def from_target_config(
        cls, hf_config: Any, draft_vocab_size: int | None = None, **overrides: Any
    ) -> Eagle3Config:
        """Shape a draft after a target (HF config object or config.json dict).

        The draft copies the target's width, heads, RoPE and norm eps; `draft_vocab_size`
        defaults to 32k or the whole target vocab when smaller; `overrides` set any field.
        """
        c = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        heads = c["num_attention_heads"]
        rope = c.get("rope_parameters") or {}
        theta = c.get("rope_theta") or rope.get("rope_theta") or 10000.0
        vocab = c["vocab_size"]
        fields: dict[str, Any] = dict(
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            vocab_size=vocab,
            draft_vocab_size=min(draft_vocab_size or 32000, vocab),
            target_hidden_size=c["hidden_size"],
        )
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Attend(Protocol):
    """Where keys/values live: `attend` stores this step's k/v and returns attention output."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, nh, q, d], k/v [B, nkv, q, d] (RoPE applied) -> [B, nh, q, d]."""
        ...

    def commit(self, n: int) -> None:
        """All layers have attended; `n` new positions are now part of the context."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics like HF LlamaRMSNorm, then back to the input dtype before the weight.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [B, q] -> cos, sin [B, 1, q, d] (Llama's rotate-half layout)."""
    inv = 1.0 / (
        theta
        ** (
            torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
        )
    )
    freqs = position_ids.float()[..., None] * inv  # [B, q, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, q, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class DecodeWeights:
    """Decode-time tensors derived from the parameters (never parameters themselves, so the
    state-dict names stay the export names): q/k/v and gate/up fused into one matmul each,
    and a RoPE table with the rotation's sign folded into sin. `key` identifies the source
    weights (storage + version): an optimizer step, `load_state_dict` or `.to()` rebuilds it;
    `sources` holds those storages so a freed one's address cannot come back under a new tensor.
    """

    key: tuple[tuple[int, int], ...]
    sources: list[torch.Tensor]
    qkv: torch.Tensor  # [(nh + 2 nkv) d, 2H]
    gate_up: torch.Tensor  # [2I, H]
    cos: torch.Tensor  # [P, d]
    sin: torch.Tensor  # [P, d], first half negated: rope(x) = x cos + swap_halves(x) sin


def _rope_table(cfg: Eagle3Config, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, signed sin [n, d] for positions 0..n-1 (bitwise `rope_cos_sin`'s values)."""
    cos, sin = rope_cos_sin(torch.arange(n)[None], cfg.head_dim, cfg.rope_theta, dtype)
    sin = sin[0, 0].clone()  # [n, d]
    sin[:, : cfg.head_dim // 2].neg_()
    return cos[0, 0], sin


def _rms(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm in one kernel for fp32 (bitwise equal to `RMSNorm.forward` there)."""
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
    return norm(x)


class Attention(nn.Module):
    """GQA self-attention whose q/k/v read the 2H-wide [embedding ; hidden] input."""

    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.nh, self.nkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(2 * h, self.nh * d, bias=False)
        self.k_proj = nn.Linear(2 * h, self.nkv * d, bias=False)
        self.v_proj = nn.Linear(2 * h, self.nkv * d, bias=False)
        self.o_proj = nn.Linear(self.nh * d, h, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend, layer: int
    ) -> torch.Tensor:
        b, q, _ = x.shape
        qs = self.q_proj(x).view(b, q, self.nh, self.d).transpose(1, 2)  # [B, nh, q, d]
        ks = self.k_proj(x).view(b, q, self.nkv, self.d).transpose(1, 2)  # [B, nkv, q, d]
        vs = self.v_proj(x).view(b, q, self.nkv, self.d).transpose(1, 2)
        out = attend.attend(layer, apply_rope(qs, cos, sin), apply_rope(ks, cos, sin), vs)
        return self.o_proj(out.transpose(1, 2).reshape(b, q, self.nh * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    """The one EAGLE-3 decoder layer (`midlayer.*` in SGLang's names)."""

    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self,
        emb: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend: Attend,
    ) -> torch.Tensor:
        x = torch.cat([self.input_layernorm(emb), self.hidden_norm(hidden)], dim=-1)  # [B, q, 2H]
        h = hidden + self.self_attn(x, cos, sin, attend, 0)  # residual: the un-normalised h
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Draft(nn.Module):
    """EAGLE-3 draft. `d2t` [Vd] int64 offsets (target = draft + d2t[draft]); `t2d` [V] bool."""

    d2t: torch.Tensor
    t2d: torch.Tensor

    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.embed_tokens.weight.requires_grad_(False)  # frozen copy of the target's
        self.fc = nn.Linear(cfg.num_aux * cfg.target_hidden_size, h, bias=False)
        self.midlayer = MidLayer(cfg)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[: cfg.draft_vocab_size] = True
        self.register_buffer("t2d", t2d)

    def combine(self, aux: torch.Tensor) -> torch.Tensor:
        """aux [B, T, k*H_t] -> [B, T, H]."""
        return linear(aux.to(self.fc.weight.dtype), self.fc.weight)

    def step(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Attend,
    ) -> torch.Tensor:
        """One draft step without the head: -> h_out [B, q, H] (pre-norm)."""
        emb = self.embed_tokens(input_ids).to(hidden.dtype)  # [B, q, H]
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, hidden.dtype)
        h_out = self.midlayer(emb, hidden, cos, sin, cache)
        cache.commit(input_ids.shape[1])
        return h_out

    def logits(self, h_out: torch.Tensor) -> torch.Tensor:
        """[..., H] -> draft-vocab logits [..., Vd]."""
        return self.lm_head(self.norm(h_out))

    def decode(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Attend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, q], hidden [B, q, H], position_ids [B, q] -> (logits [B, q, Vd], h_out).

        Without autograd (inference) this takes the fused `decode_step`; with it, `step`.
        """
        if torch.is_grad_enabled():
            h_out = self.step(input_ids, hidden, position_ids, cache)
            return self.logits(h_out), h_out
        h_out = self.decode_step(input_ids, hidden, position_ids, cache)
        return self.decode_logits(h_out), h_out

    def decode_weights(self, max_position: int, dtype: torch.dtype) -> DecodeWeights:
        """The fused decode tensors, rebuilt when a source weight changed or RoPE must grow."""
        att, mlp = self.midlayer.self_attn, self.midlayer.mlp
        src = [att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]
        src += [mlp.gate_proj.weight, mlp.up_proj.weight]
        key = tuple((w.data_ptr(), w._version) for w in src)
        dw: DecodeWeights | None = self.__dict__.get("_decode_weights")  # not a module attribute
        if dw is None or dw.key != key:
            with torch.no_grad():
                cos, sin = _rope_table(self.cfg, 1024, dtype)
                qkv, gate_up = torch.cat(src[:3]), torch.cat(src[3:])
                dw = DecodeWeights(key, [w.detach() for w in src], qkv, gate_up, cos, sin)
        if max_position >= dw.cos.shape[0] or dw.cos.dtype != dtype:
            dw.cos, dw.sin = _rope_table(self.cfg, 2 * (max_position + 1), dtype)
        self.__dict__["_decode_weights"] = dw
        return dw

    def decode_step(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Attend,
    ) -> torch.Tensor:
        """`step` for inference, same math in fewer kernels -> h_out [B, q, H] (pre-norm).

        q/k/v and gate/up are one matmul each, RoPE is a table lookup applied once over the
        q and k heads together, RMSNorm is one kernel, and every matmul of a few rows takes
        the skinny path (`specctl.skinny`: half the step on CPU). Equal to `step` up to
        matmul rounding.
        """
        layer, att = self.midlayer, self.midlayer.self_attn
        b, n = input_ids.shape
        nh, nkv, d = att.nh, att.nkv, att.d
        dw = self.decode_weights(int(position_ids.max()), hidden.dtype)
        # 1. [input_layernorm(embed(tok)) ; hidden_norm(h)] -> [B, q, 2H]
        emb = self.embed_tokens(input_ids).to(hidden.dtype)  # [B, q, H]
        x = torch.cat([_rms(layer.input_layernorm, emb), _rms(layer.hidden_norm, hidden)], -1)
        # 2. q, k, v in one matmul; RoPE once over the nh + nkv query and key heads.
        qkv = linear(x, dw.qkv).view(b, n, nh + 2 * nkv, d).transpose(1, 2)  # [B, nh+2nkv, q, d]
        cos, sin = dw.cos[position_ids][:, None], dw.sin[position_ids][:, None]  # [B, 1, q, d]
        qk = qkv[:, : nh + nkv]
        qk = qk * cos + torch.roll(qk, d // 2, -1) * sin  # [B, nh+nkv, q, d]
        out = cache.attend(0, qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv :])  # [B, nh, q, d]
        attn = out.transpose(1, 2).reshape(b, n, nh * d)  # [B, q, nh*d]
        h = hidden + linear(attn, att.o_proj.weight)  # [B, q, H]
        # 3. SwiGLU MLP with gate and up in one matmul.
        gate, up = linear(_rms(layer.post_attention_layernorm, h), dw.gate_up).chunk(2, -1)
        h = h + linear(F.silu(gate) * up, layer.mlp.down_proj.weight)
        cache.commit(n)
        return h

    def decode_logits(self, h_out: torch.Tensor) -> torch.Tensor:
        """`logits` with the one-kernel RMSNorm (inference)."""
        return linear(_rms(self.norm, h_out), self.lm_head.weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Attend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decode(input_ids, hidden, position_ids, cache)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def set_vocab(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    @torch.no_grad()
    def init_from_target(
        self,
        embed: torch.Tensor,
        target_lm_head: torch.Tensor,
        final_norm: torch.Tensor | None = None,
    ) -> None:
        """Copy the frozen embedding and start the draft head from the target's draft-vocab rows.

        Call after `set_vocab`: the head rows are `target_lm_head[draft_id + d2t[draft_id]]`.
        `final_norm` (the target's `model.norm.weight`) starts `norm` too, so that at step 0
        logits = target_lm_head(target_norm(h)) restricted to the draft vocab: the draft only
        has to learn the target's last hidden state, not a rescaled one (SmolLM2's final norm
        weights average ~1.8, far from the all-ones default).
        """
        self.embed_tokens.weight.copy_(embed)
        ids = torch.arange(self.cfg.draft_vocab_size, device=self.d2t.device)
        self.lm_head.weight.copy_(target_lm_head[self.to_target_ids(ids).to(target_lm_head.device)])
        if final_norm is not None:
            self.norm.weight.copy_(final_norm)

    @torch.no_grad()
    def init_logit_lens(self) -> None:
        """Start as the target's logit lens on its deepest aux layer: `fc` copies that state
        and the layer's residual branches (o_proj, down_proj) start at zero, so step-0 logits
        = lm_head(norm(aux_deepest)). With the head and norm from the target this agrees with
        the target's next token ~49% of the time on SmolLM2 (layer 26 of 30) before any
        training, where a random fc starts at ~0% and needs thousands of tokens to get there.
        """
        h, k = self.cfg.hidden_size, self.cfg.num_aux
        if self.cfg.target_hidden_size != h:
            return  # no identity map between different widths: keep the random init
        self.fc.weight.zero_()
        self.fc.weight[:, (k - 1) * h :].copy_(torch.eye(h))
        self.midlayer.self_attn.o_proj.weight.zero_()
        self.midlayer.mlp.down_proj.weight.zero_()


class DraftCache:
    """K/V for incremental decoding: preallocated per layer, grown by doubling when full.

    `length` positions are valid; `crop(n_keep)` drops rejected draft positions (no copy).
    New queries see every cached key plus the new keys causally.
    """

    def __init__(self, capacity: int = 256) -> None:
        self.length = 0
        self._capacity = capacity
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        self._tri: torch.Tensor | None = None  # [C, C] bool causal triangle, masks are views

    def crop(self, n_keep: int) -> None:
        if not 0 <= n_keep <= self.length:
            raise ValueError(f"crop({n_keep}) outside 0..{self.length}")
        self.length = n_keep

    def commit(self, n: int) -> None:
        self.length += n

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        start, n = self.length, q.shape[2]
        kb, vb = self._reserve(layer, k, start + n)
        kb[:, :, start : start + n] = k
        vb[:, :, start : start + n] = v
        keys, values = kb[:, :, : start + n], vb[:, :, : start + n]
        mask = self._mask(start, n, q.device)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)

    def _mask(self, start: int, n: int, device: torch.device) -> torch.Tensor | None:
        """[n, start+n] bool: the keys each new query sees (None: one query sees all).

        A view of one preallocated causal triangle (grown by doubling), not a new mask per call.
        """
        if n <= 1:
            return None
        tri = self._tri
        if tri is None or tri.shape[0] < start + n or tri.device != device:
            size = max(self._capacity, 2 * (start + n))
            tri = torch.ones(size, size, dtype=torch.bool, device=device).tril_()
            self._tri = tri
        return tri[start : start + n, : start + n]

    def _reserve(
        self, layer: int, like: torch.Tensor, need: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kb = self._k.get(layer)
        if kb is None or kb.shape[2] < need:
            cap = max(self._capacity, need)
            while cap < need:
                cap *= 2
            if kb is not None:
                cap = max(cap, 2 * kb.shape[2])
            shape = (*like.shape[:2], cap, like.shape[3])
            new_k = like.new_zeros(shape)
            new_v = like.new_zeros(shape)
            if kb is not None:
                new_k[:, :, : self.length] = kb[:, :, : self.length]
                new_v[:, :, : self.length] = self._v[layer][:, :, : self.length]
            self._k[layer], self._v[layer] = new_k, new_v
        return self._k[layer], self._v[layer]


def load_target_rows(model_dir: Path | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding [V, H], lm_head [V, H]) read from the target's safetensors alone, not the model.

    Tied checkpoints (SmolLM2) have no `lm_head.weight`: the embedding is returned for both.
    """
    from safetensors import safe_open

    from specctl.errors import InputError

    root = Path(model_dir)
    weight_map = _weight_map(root)
    if weight_map is None:
        raise InputError(f"no safetensors weights in {root}", "pass a local HF model folder")

    def read(name: str) -> torch.Tensor:
        with safe_open(str(root / weight_map[name]), framework="pt") as f:
            return f.get_tensor(name).float()

    embed_key = next(
        (k for k in ("model.embed_tokens.weight", "embed_tokens.weight") if k in weight_map), None
    )
    if embed_key is None:
        raise InputError(f"{root} has no embed_tokens weight")
    embed = read(embed_key)
    head = read("lm_head.weight") if "lm_head.weight" in weight_map else embed
    return embed, head


def _weight_map(root: Path) -> dict[str, str] | None:
    """Tensor name -> safetensors file of a HF folder (sharded or not); None without weights."""
    from safetensors import safe_open

    index = root / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    if (root / "model.safetensors").is_file():
        with safe_open(str(root / "model.safetensors"), framework="pt") as f:
            return {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118
    return None


def load_target_norm(model_dir: Path | str) -> torch.Tensor | None:
    """The target's final RMSNorm weight [H] (`model.norm.weight`), or None if it has none."""
    from safetensors import safe_open

    root = Path(model_dir)
    weight_map = _weight_map(root)
    if weight_map is None:
        return None
    key = next((k for k in ("model.norm.weight", "norm.weight") if k in weight_map), None)
    if key is None:
        return None
    with safe_open(str(root / weight_map[key]), framework="pt") as f:
        return f.get_tensor(key).float()
