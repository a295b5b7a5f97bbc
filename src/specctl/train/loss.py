"""Soft cross-entropy through the draft LM head, chunked, with gradients formed in the forward.

The head over the draft vocab dominates training cost and memory: full [N, Vd] fp32 logits
for 7 TTT steps would be kept for backward (~1.8 GB at N=2048, Vd=32k). Like Liger's fused
linear cross-entropy we walk row chunks once, compute the loss, the top-1 hits and the
gradients w.r.t. the head input and weight right away (d loss / d logits = softmax - p for
a target distribution p that sums to 1), and keep only those; backward just scales them.
Same FLOPs as forward + backward, peak extra memory one [chunk, Vd] block.
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x [N, H], weight [Vd, H], target_p [N, Vd] (rows sum to 1), row_weight [N]
        n, vd = target_p.shape
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
            logits = (xc @ weight.t()).to(acc)  # [c, Vd]
            logq = torch.log_softmax(logits, dim=-1)
            loss += -((pc * logq).sum(-1) * wc).sum()
            hits += (logits.argmax(-1) == pc.argmax(-1)).sum()
            g = ((logq.exp() - pc) * wc[:, None]).to(x.dtype)  # d loss / d logits
            if grad_x is not None:
                grad_x[a : a + rows] = g @ weight
            if grad_w is not None:
                grad_w += (g.t() @ xc).to(acc)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(hits)
        return loss, hits

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_hits: Any) -> tuple[Any, ...]:
        grad_x, grad_w = ctx.saved_tensors
        gx = None if grad_x is None else grad_x * grad_loss.to(grad_x.dtype)
        gw = None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype)
        return gx, gw, None, None


def linear_soft_ce(
    x: torch.Tensor,
    weight: torch.Tensor,
    target_p: torch.Tensor,
    row_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-sum_rows row_weight * sum_v p log softmax(x W^T) and the number of top-1 hits.

    x [N, H], weight [Vd, H], target_p [N, Vd] -> (loss_sum [] fp32, hits [] int64).
    """
    if row_weight is None:
        row_weight = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    return _LinearSoftCE.apply(x, weight, target_p, row_weight.to(acc_dtype(x.dtype)))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in fp32, or fp64 for fp64 inputs (gradchecks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
