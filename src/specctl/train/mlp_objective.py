"""The MLP speculator objective (`--draft mlp`): teacher-forced heads, one function.

Alignment (draft/mlp.py): row t holds the target's last hidden state after x_t; head i
consumes x_{t+1+i} and is scored against the target's distribution at position t+1+i
(softmax of the frozen target lm_head on `last_hidden[t+1+i]`, which predicts x_{t+2+i}),
on rows whose target position is in the loss mask. This is the EAGLE-3 TTT alignment with
head i in place of TTT step i, so `TTTResult` with K = n_predict carries the metrics and the
loop, evaluation (acc_i, simulated AL = 1 + sum_i prod_{j<=i} acc_j), checkpoints and the
best-by-AL choice are shared with EAGLE-3.

Loss: soft cross-entropy (forward KL up to the target's entropy) against that distribution,
not hard CE on the record's next token: acceptance is agreement with the target's argmax,
and on dataset text (phase 1, no --regenerate) the record's tokens are not what the target
would say while its distribution is; after --regenerate (phase 2) the two coincide at
temperature 0. On the tiny-target learning test both learn; KL gives the target-argmax
accuracy directly. Loss of head i is summed over its rows and divided by its loss-mask count
(global over ranks and micro-batches when the loop passes `denom`); total = sum_i w_i loss_i
with `mlp.head_weights` (default 1.0 each, as IBM's speculator training sums the heads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specctl.draft.mlp import MLPSpeculator
from specctl.train.loss import acc_dtype, linear_soft_ce
from specctl.train.objective import TargetHead, TTTResult, shift_left, step_counts


def mlp_loss(
    draft: MLPSpeculator,
    head: TargetHead,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    last_hidden: torch.Tensor,
    weights: list[float],
    denom: torch.Tensor | None = None,
) -> TTTResult:
    """input_ids [B, T], loss_mask [B, T], last_hidden [B, T, H] -> TTTResult (K = n_predict).

    Right padding is harmless as long as padded positions have loss_mask 0: no row is
    scored against them, and a head reading a padded token only affects unscored rows.
    """
    b, t = input_ids.shape
    n = draft.n_predict
    # 1. Target distribution (full vocab) at every loss-mask position; row_of maps a flat
    #    position (b*T + t) to its row in `probs` or -1.
    flat_mask = loss_mask.reshape(-1).bool()  # [B*T]
    positions = flat_mask.nonzero().squeeze(1)  # [P]
    probs, _ = head.distribution(last_hidden.reshape(b * t, -1)[positions])  # [P, V]
    row_of = torch.full((b * t,), -1, dtype=torch.long, device=input_ids.device)
    row_of[positions] = torch.arange(positions.numel(), device=input_ids.device)
    row_of = row_of.view(b, t)

    # 2. Teacher-forced states of every head: tokens[:, j] = x_{j+1}, zeros past the end.
    tokens = F.pad(input_ids[:, 1:], (0, n))  # [B, T + n - 1]
    hidden = last_hidden.to(draft.head_weight(0).dtype)
    states = draft.states(hidden, tokens)  # [n, B, T, D]

    count = step_counts(loss_mask, n) if denom is None else denom
    loss = states.new_zeros((), dtype=acc_dtype(states.dtype))
    loss_sum, hits, valid = [], [], []
    for i in range(n):
        # 3. Head i at row t is scored against the target at position t+1+i.
        target_row = shift_left(row_of, i + 1, fill=-1).reshape(-1)  # [B*T]
        rows = (target_row >= 0).nonzero().squeeze(1)  # [N_i]
        target_p = probs[target_row[rows]]  # [N_i, V]

        # 4. Soft CE through head i on those rows only (chunked, fused gradients).
        x = states[i].reshape(b * t, -1)[rows]  # [N_i, D]
        ce_sum, hit = linear_soft_ce(x, draft.head_weight(i), target_p, mm_dtype=head.mm_dtype)
        loss = loss + weights[i] * ce_sum / count[i].to(loss.dtype).clamp(min=1)
        loss_sum.append(ce_sum.detach())
        hits.append(hit)
        valid.append(rows.numel())

    # 5. Per-head sums; the caller all-reduces them before forming means.
    return TTTResult(
        loss=loss,
        loss_sum=torch.stack(loss_sum),
        hits=torch.stack(hits).float(),
        count=step_counts(loss_mask, n),
        valid=torch.tensor(valid, dtype=torch.float32),
    )


class MLPModel(nn.Module):
    """The unit FSDP wraps for `--draft mlp`; same call signature as `setup.TTTModel`."""

    def __init__(self, draft: MLPSpeculator, head: TargetHead, weights: list[float]) -> None:
        super().__init__()
        self.draft = draft
        self.head = head  # plain attribute: frozen, not sharded
        self.weights = list(weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        aux: torch.Tensor,  # unused: [B, T, 0] (the speculator reads last_hidden only)
        last_hidden: torch.Tensor,
        denom: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        r = mlp_loss(self.draft, self.head, input_ids, loss_mask, last_hidden, self.weights, denom)
        return r.loss, r.loss_sum, r.hits, r.count, r.valid
