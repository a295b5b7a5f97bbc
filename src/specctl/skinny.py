"""Skinny linears: decode-time matmuls that stream their weights at full bandwidth on CPU.

A decode step or a verify pass multiplies a few rows (M = 1-8 positions) by every weight
matrix once, so it is bound by reading the weights. Measured on the 2-core CPU here
(bench/bench_decode.py's verify_cost rows; docs/benchmarks.md "Skinny linears"),
`F.linear(x, W)` = x @ W^T for small M runs MKL paths that read W at 5-12 GB/s (and M = 2, 3
are slower than M = 5); the same product computed as (W @ x^T)^T, W as the left operand,
streams W at 20-35 GB/s for M >= 2. M = 1 has no fast path of its own (a GEMV either way),
so it runs as two rows and the copy is dropped.

Whether it pays depends on the CPU's BLAS: on an Intel Xeon with AMX (oneDNN) `F.linear`
itself streams a 1-row product fast and the skinny form is 2x slower. So the row counts that
take the skinny path are a choice measured on the machine at hand: eval-accept times target
forwards both ways before decoding (`evaluate.calibrate`) and keeps, per row count, the
faster one (`use_skinny_linears(model, rows=...)`, and `set_default_rows` for the draft).

`linear(x, w, b)` is the dispatch: the skinny path for inference calls (grad disabled) of
fp32 CPU rows whose count is in the chosen set (1..MAX_ROWS until measured), `F.linear` for
everything else (training, prefills, other dtypes and devices). The EAGLE-3 draft's decode
path calls it directly; `use_skinny_linears(model)` routes every `nn.Linear` of a model (the
HF target) through it, one attribute per module, undone by `use_skinny_linears(model, False)`.

Results agree with `F.linear` to float rounding (logits within ~1e-5), the same order as
`F.linear`'s own differences between row counts, so greedy speculative decoding stays
lossless exactly as far as it did before (eval-accept `--check-lossless` checks it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 8  # measured crossover: above ~8 rows MKL's own GEMM is as fast (bench_decode)
ALL_ROWS = frozenset(range(1, MAX_ROWS + 1))
_default_rows = ALL_ROWS  # row counts `linear` routes when the caller names none (the draft)


def set_default_rows(rows: Iterable[int]) -> None:
    """The row counts `linear` takes the skinny path for by default (the draft's decode)."""
    global _default_rows
    _default_rows = frozenset(rows)


def default_rows() -> frozenset[int]:
    return _default_rows


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T (+ bias) as (weight @ x^T)^T; M = 1 runs as two rows."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)  # [M, K]
    m = rows.shape[0]
    if m == 1:
        # [2, K]: the 2-row GEMM streams W, the 1-row GEMV does not; a real copy, because
        # a stride-0 `expand` takes a slow path
        rows = rows.repeat(2, 1)
    out = (weight @ rows.t()).t()[:m].contiguous()  # [N, M'] -> [M, N]
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    rows: frozenset[int] | None = None,
) -> torch.Tensor:
    """`F.linear`, taking the skinny path for inference calls of fp32 CPU rows whose count is
    in `rows` (None: `default_rows()`)."""
    if (
        torch.is_grad_enabled()
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or x.numel() // max(x.shape[-1], 1) not in (_default_rows if rows is None else rows)
    ):
        return F.linear(x, weight, bias)
    return skinny_linear(x, weight, bias)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias, self._skinny_rows)  # type: ignore[arg-type]


def use_skinny_linears(model: nn.Module, on: bool = True, rows: Iterable[int] = ALL_ROWS) -> int:
    """Route (on) or stop routing (off) the model's `nn.Linear`s through `linear` for calls of
    `rows` rows; count them. No rows is off: no dispatch on every call for nothing."""
    chosen = frozenset(rows)
    n = 0
    for mod in model.modules():
        if not isinstance(mod, nn.Linear):
            continue
        if on and chosen:
            mod._skinny_rows = chosen  # type: ignore[assignment]
            mod.forward = _forward.__get__(mod)  # type: ignore[method-assign]
        else:
            mod.__dict__.pop("forward", None)
            mod.__dict__.pop("_skinny_rows", None)
        n += 1
    return n


def skinny_enabled(model: Any) -> bool:
    return any("_skinny_rows" in m.__dict__ for m in model.modules() if isinstance(m, nn.Linear))


def skinny_rows(model: Any) -> frozenset[int]:
    """The row counts the model's linears take the skinny path for (empty: none routed)."""
    for m in model.modules():
        if isinstance(m, nn.Linear) and "_skinny_rows" in m.__dict__:
            return frozenset(m.__dict__["_skinny_rows"])
    return frozenset()
