"""The EAGLE-3 training-time-test (TTT) objective, one function read top to bottom.

Alignment (reference/export-clients.md Q3): row t pairs aux state g_t with token x_{t+1}
and the target distribution at position t+1 (softmax over the draft vocab of the frozen
target lm_head applied to `last_hidden[t+1]`). TTT step k shifts ids, loss mask and targets
k more to the left: row t consumes x_{t+k+1} at RoPE position t+k, with the hidden state
its own step k-1 produced, and is scored against the target at position t+k+1. Attention:
a step-k query sees keys 0..t of step 0 and the diagonal keys of steps 1..k (row t), see
`ttt_attention.py`.

Loss of step k = soft cross-entropy (forward KL up to the target's entropy) summed over rows
whose target position is an assistant token (loss mask) and whose target argmax is in the
draft vocab, divided by the number of loss-mask positions of step k (`count`, global over
ranks and micro-batches when the loop passes `denom`); total = sum_k 0.8^k loss_k.
acc_k counts out-of-vocab positions as misses, so simulated AL = 1 + sum_i prod_{j<=i} acc_j
does not flatter a small vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from specctl.draft.eagle3 import Eagle3Draft
from specctl.train.loss import CHUNK_BYTES, acc_dtype, linear_soft_ce, pad_rows
from specctl.train.ttt_attention import TTTAttention


@dataclass
class TTTResult:
    loss: torch.Tensor  # [] the weighted loss to backpropagate
    loss_sum: torch.Tensor  # [K] fp32, per-step CE summed over rows (detached)
    hits: torch.Tensor  # [K] top-1 agreements with the target argmax
    count: torch.Tensor  # [K] loss-mask positions per step (denominators)
    valid: torch.Tensor  # [K] of those, positions with the target argmax in the draft vocab


class TargetHead:
    """The frozen target lm_head [V, H] (not a module: FSDP and mixed precision leave it alone).

    `mm_dtype` is the dtype of the LM-head products of a step, this head's logits and the
    draft head's loss and gradients (`linear_soft_ce`): bf16 where the machine multiplies
    faster in it (`specctl.precision.matmul_dtype`), softmax and sums in fp32; None: the
    weights' own dtype.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        t2d: torch.Tensor,
        mm_dtype: torch.dtype | None = None,
        mm_info: dict[str, Any] | None = None,  # how mm_dtype was chosen (the run's summary)
    ) -> None:
        self.weight = weight
        self.t2d = t2d.to(weight.device)
        self.draft_rows = self.t2d.nonzero().squeeze(1)  # [Vd] target ids in draft order
        self.mm_dtype, self.mm_info = mm_dtype, mm_info or {}
        self.mm_weight = weight if mm_dtype is None else weight.to(mm_dtype)

    @torch.no_grad()
    def distribution(self, last_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """last_hidden [N, H] -> (probs over the draft vocab [N, Vd] fp32, argmax in vocab [N]).

        Chunked so that no more than one [chunk, V] fp32 block of full-vocab logits exists.
        """
        n, vocab = last_hidden.shape[0], self.weight.shape[0]
        rows = max(1, CHUNK_BYTES // (4 * vocab))
        acc = acc_dtype(self.weight.dtype)
        probs = torch.empty(n, self.draft_rows.numel(), dtype=acc, device=last_hidden.device)
        in_vocab = torch.empty(n, dtype=torch.bool, device=last_hidden.device)
        for a in range(0, n, rows):
            w, h = self.mm_weight, last_hidden[a : a + rows]
            logits = (pad_rows(h.to(w.dtype), self.mm_dtype) @ w.t())[: h.shape[0]]  # [c, V]
            in_vocab[a : a + rows] = self.t2d[logits.argmax(-1)]
            probs[a : a + rows] = torch.softmax(logits[:, self.draft_rows].to(acc), dim=-1)
        return probs, in_vocab


def step_counts(loss_mask: torch.Tensor, ttt_length: int) -> torch.Tensor:
    """loss_mask [B, T] -> [K]: loss-mask positions each TTT step is scored on."""
    return torch.stack([loss_mask[:, k + 1 :].sum() for k in range(ttt_length)]).float()


def shift_left(x: torch.Tensor, n: int, fill: int = 0) -> torch.Tensor:
    """[B, T] -> [B, T] with x[:, t+n] at t, `fill` past the end."""
    return F.pad(x[:, n:], (0, n), value=fill)


def ttt_loss(
    draft: Eagle3Draft,
    head: TargetHead,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    aux: torch.Tensor,
    last_hidden: torch.Tensor,
    ttt_length: int = 7,
    decay: float = 0.8,
    denom: torch.Tensor | None = None,
) -> TTTResult:
    """input_ids [B, T], loss_mask [B, T], aux [B, T, k*Ht], last_hidden [B, T, Ht] -> TTTResult.

    Right padding needs no attention mask (causal attention never looks right) as long as
    padded positions have loss_mask 0.
    """
    b, t = input_ids.shape
    # 1. Target distribution at every loss-mask position; row_of maps a flat position
    #    (b*T + t) to its row in `probs` or -1.
    flat_mask = loss_mask.reshape(-1).bool()  # [B*T]
    positions = flat_mask.nonzero().squeeze(1)  # [P]
    probs, in_vocab = head.distribution(last_hidden.reshape(b * t, -1)[positions])  # [P, Vd], [P]
    row_of = torch.full((b * t,), -1, dtype=torch.long, device=input_ids.device)
    row_of[positions] = torch.arange(positions.numel(), device=input_ids.device)
    row_of = row_of.view(b, t)

    # 2. Step-0 hidden state: fc over the concatenated aux states.
    hidden = draft.combine(aux)  # [B, T, H]
    attn = TTTAttention()
    count = step_counts(loss_mask, ttt_length) if denom is None else denom
    loss = hidden.new_zeros((), dtype=acc_dtype(hidden.dtype))
    loss_sum, hits, valid = [], [], []
    for k in range(ttt_length):
        # 3. Step k: tokens x_{t+k+1} at positions t+k, fed the previous step's pre-norm hidden.
        ids_k = shift_left(input_ids, k + 1)  # [B, T]
        pos_k = (torch.arange(t, device=input_ids.device) + k).expand(b, t)  # [B, T]
        hidden = draft.step(ids_k, hidden, pos_k, attn)  # [B, T, H]

        # 4. Rows scored at this step: target position t+k+1 in the loss mask, argmax in vocab.
        target_row = shift_left(row_of, k + 1, fill=-1).reshape(-1)  # [B*T]
        rows = (target_row >= 0).nonzero().squeeze(1)
        rows = rows[in_vocab[target_row[rows]]]  # [N_k]
        target_p = probs[target_row[rows]]  # [N_k, Vd]

        # 5. Soft CE through the draft head on those rows only (chunked, fused gradients).
        x = draft.norm(hidden.reshape(b * t, -1)[rows])  # [N_k, H]
        ce_sum, hit = linear_soft_ce(x, draft.lm_head.weight, target_p, mm_dtype=head.mm_dtype)
        loss = loss + decay**k * ce_sum / count[k].to(loss.dtype).clamp(min=1)
        loss_sum.append(ce_sum.detach())
        hits.append(hit)
        valid.append(rows.numel())

    # 6. Per-step sums; the caller all-reduces them before forming means.
    return TTTResult(
        loss=loss,
        loss_sum=torch.stack(loss_sum),
        hits=torch.stack(hits).float(),
        count=step_counts(loss_mask, ttt_length),
        valid=torch.tensor(valid, dtype=torch.float32),
    )


def simulated_al(acc: list[float]) -> float:
    """1 + sum_i prod_{j<=i} acc_j: expected accepted tokens per chain of len(acc) drafts."""
    total, prod = 1.0, 1.0
    for a in acc:
        prod *= a
        total += prod
    return total
