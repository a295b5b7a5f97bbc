"""Training-time-test attention without [T, T*k] masks.

At TTT step k the query at row t may see the step-0 keys 0..t (the target context, causal)
and the diagonal keys of steps 1..k at the same row t (the draft's own earlier steps).
Softmax runs jointly over both sets. We compute:

1. diagonal scores s_j = q_t . kd_j,t (elementwise, [.., T, k]) -> their logsumexp c_t and
   the diagonal-only output o_d = softmax(s) @ vd;
2. the causal part with one SDPA call that also tells how much weight the diagonal gets:
   an extra *sentinel* key whose score is exactly c_t (a per-query score, carried by an
   extra query channel q'_t = c_t / scale against a key channel that is 1 only for the
   sentinel) and whose value is 1 in an extra value channel (0 elsewhere). SDPA returns
   [(1 - a_t) * o_causal, a_t], a_t = sum of diagonal weights in the joint softmax;
3. out = (1 - a_t) * o_causal + a_t * o_d: the exact joint softmax, differentiable
   through SDPA's own backward (c_t gets its gradient via q').

The sentinel is key 0 and a dummy query is prepended, so plain `is_causal=True` gives every
query the sentinel plus keys 0..t, with no mask tensor at all. Step 0 is plain causal SDPA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from specctl.train.loss import acc_dtype


class TTTAttention:
    """The `Attend` object for one TTT unroll (one layer): keeps step-0 K/V and the diagonals."""

    def __init__(self) -> None:
        self.steps = 0
        self._k0: torch.Tensor | None = None  # [B, nkv, T+1, d+1] sentinel + step-0 keys
        self._v0: torch.Tensor | None = None
        self._kd: list[torch.Tensor] = []  # per step >= 1: [B, nkv, T, d]
        self._vd: list[torch.Tensor] = []

    def commit(self, n: int) -> None:
        self.steps += 1

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, nh, t, d = q.shape
        nkv = k.shape[1]
        g = nh // nkv
        scale = 1.0 / math.sqrt(d)
        if self.steps == 0:
            self._k0, self._v0 = _with_sentinel(k), _with_sentinel(v)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        assert self._k0 is not None and self._v0 is not None
        self._kd.append(k)
        self._vd.append(v)
        # 1. diagonal scores over steps 1..k: [B, nkv, g, T, k]
        qg = q.view(b, nkv, g, t, d)
        kd = torch.stack(self._kd, dim=-2)  # [B, nkv, T, k, d]
        vd = torch.stack(self._vd, dim=-2)
        s = torch.einsum("bngtd,bntjd->bngtj", qg, kd) * scale
        sf = s.to(acc_dtype(s.dtype))
        c = torch.logsumexp(sf, dim=-1).to(q.dtype)  # [B, nkv, g, T]
        o_d = torch.einsum("bngtj,bntjd->bngtd", torch.softmax(sf, -1).to(q.dtype), vd)
        # 2. causal part + sentinel: queries [dummy; q] with an extra channel c / scale
        q1 = torch.cat([q, (c / scale).reshape(b, nh, t, 1)], dim=-1)  # [B, nh, T, d+1]
        q1 = F.pad(q1, (0, 0, 1, 0))  # dummy query at index 0 -> [B, nh, T+1, d+1]
        o1 = F.scaled_dot_product_attention(
            q1, self._k0, self._v0, is_causal=True, scale=scale, enable_gqa=True
        )[:, :, 1:]
        # 3. joint softmax: o1[..., :d] is already weighted by (1 - a); add a * o_d
        a = o1[..., d:]  # [B, nh, T, 1]
        return o1[..., :d] + a * o_d.reshape(b, nh, t, d)


def _with_sentinel(x: torch.Tensor) -> torch.Tensor:
    """[B, n, T, d] -> [B, n, T+1, d+1]: row 0 is the sentinel (0, ..., 0, 1), others get a 0 channel."""
    x = F.pad(x, (0, 1, 1, 0))
    x[:, :, 0, -1] = 1.0
    return x
