"""Soft cross-entropy through the draft LM head, chunked, with gradients formed in the forward.

The head over the draft vocab dominates training cost and memory: full [N, Vd] fp32 logits
for 7 TTT steps would be kept for backward (~1.8 GB at N=2048, Vd=32k). Like Liger's fused
linear cross-entropy we walk row chunks once, compute the loss, the top-1 hits and the
gradients w.r.t. the head input and weight right away (d loss / d logits = softmax - p for
a target distribution p that sums to 1), and keep only those; backward just scales them.
Same FLOPs as forward + backward, peak extra memory one [chunk, Vd] block.

`mm_dtype=torch.bfloat16` runs the three products in bf16 (softmax, loss and the weight
gradient's sum stay fp32): on a CPU with AMX they take a quarter of the fp32 time, and they
are most of a CPU training step (`TargetHead.mm_dtype`, chosen by `specctl.precision`).
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK_BYTES = 64 * 2**20


class _LinearSoftCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        target_p: torch.Tensor,
        row_weight: torch.Tensor,
        mm_dtype: torch.dtype | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x [N, H], weight [Vd, H], target_p [N, Vd] (rows sum to 1), row_weight [N]
        n, vd = target_p.shape
        mm = mm_dtype or x.dtype
        w = weight.detach().to(mm)  # one cast per call, not per chunk
        rows = max(1, CHUNK_BYTES // (4 * vd))
        acc = acc_dtype(x.dtype)
        loss = torch.zeros((), dtype=acc, device=x.device)
        hits = torch.zeros((), dtype=torch.int64, device=x.device)
        grad_x = torch.empty_like(x) if x.requires_grad else None
        grad_w = (
            torch.zeros(weight.shape, dtype=acc, device=x.device) if weight.requires_grad else None
        )
        for a in range(0, n, rows):
            xc, pc, wc = x[a : a + rows], target_p[a : a + rows].to(acc), row_weight[a : a + rows]
            c = xc.shape[0]
            xm = pad_rows(xc.to(mm), mm_dtype)
            logits = (xm @ w.t())[:c].to(acc)  # [c, Vd]
            logq = torch.log_softmax(logits, dim=-1)
            loss += -((pc * logq).sum(-1) * wc).sum()
            hits += (logits.argmax(-1) == pc.argmax(-1)).sum()
            g = pad_rows(((logq.exp() - pc) * wc[:, None]).to(mm), mm_dtype)  # d loss / d logits
            if grad_x is not None:
                grad_x[a : a + rows] = (g @ w)[:c]
            if grad_w is not None:
                grad_w += (g.t() @ xm).to(acc)  # zero pad rows add nothing
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(hits)
        return loss, hits

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_hits: Any) -> tuple[Any, ...]:
        grad_x, grad_w = ctx.saved_tensors
        gx = None if grad_x is None else grad_x * grad_loss.to(grad_x.dtype)
        gw = None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype)
        return gx, gw, None, None, None


def linear_soft_ce(
    x: torch.Tensor,
    weight: torch.Tensor,
    target_p: torch.Tensor,
    row_weight: torch.Tensor | None = None,
    mm_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-sum_rows row_weight * sum_v p log softmax(x W^T) and the number of top-1 hits.

    x [N, H], weight [Vd, H], target_p [N, Vd] -> (loss_sum [] fp32, hits [] int64).
    mm_dtype: dtype of the products (None: x's own).
    """
    if row_weight is None:
        row_weight = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    return _LinearSoftCE.apply(x, weight, target_p, row_weight.to(acc_dtype(x.dtype)), mm_dtype)


ROW_QUANTUM = 64


def pad_rows(x: torch.Tensor, mm_dtype: torch.dtype | None) -> torch.Tensor:
    """x [M, K] zero-padded to a multiple of 64 rows when products run in `mm_dtype`.

    oneDNN builds (JIT-compiles) a bf16 kernel per new shape: with M varying every call, as
    the scored rows of a TTT step do, that costs 2-3 ms a product and ate the whole bf16 gain
    (measured). Rounding M up keeps a handful of shapes; fp32 (MKL) needs no padding.
    """
    if (mm_dtype or x.dtype) != torch.bfloat16 or x.shape[0] % ROW_QUANTUM == 0:
        return x
    return torch.nn.functional.pad(x, (0, 0, 0, -x.shape[0] % ROW_QUANTUM))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in fp32, or fp64 for fp64 inputs (gradchecks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
