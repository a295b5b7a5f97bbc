"""bf16 or fp32 for a CPU forward, chosen by timing the model on the machine at hand.

Which is faster flips between CPUs of one kind. On a Xeon with AMX, SmolLM2-135M runs a
256-token prefill 3.1x and a batch-16 decode step 1.9x faster in bf16 than in fp32
(docs/benchmarks.md, "Producer and trainer precision"); on CPUs without AVX512-BF16, bf16 prefill is
about 6x *slower*. So a producer that would be told one dtype by habit is wrong on one of
them: `pick_dtype` times both on a short prefill and a batch-16 decode step and keeps bf16
only when it wins clearly. On GPUs bf16 always wins.

Two users: serve-target's hf engine (`pick_dtype`; its records are bf16 either way, and a
draft trained on a bf16 target's states serves an fp32 one, the states agree to bf16
rounding) and train-draft's LM-head products (`matmul_dtype`: inputs rounded to bf16,
softmax and sums in fp32, as in any bf16 mixed-precision training). eval-accept keeps the
target it is given in fp32: greedy losslessness is judged against that target alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

CHOICES = ("auto", "fp32", "bf16")
MARGIN = 0.8  # bf16 must take < 0.8x fp32's time: a near-tie keeps fp32's exact states
MIN_MS = 1.0  # a head product faster than this in fp32 is not worth rounding


def parse(precision: str) -> str:
    if precision not in CHOICES:
        from specctl.errors import UsageError

        raise UsageError(f"--precision must be auto, fp32 or bf16, not {precision!r}")
    return precision


def bf16_wins(fp32_ms: float, bf16_ms: float, min_ms: float = 0.0) -> bool:
    """The rule both choices apply: bf16 by a clear margin, on work long enough to time."""
    return fp32_ms >= min_ms and bf16_ms < MARGIN * fp32_ms


def pick_dtype(
    load: Callable[[torch.dtype], Any], precision: str, device: str
) -> tuple[Any, dict[str, Any]]:
    """(the model `load(dtype)` gives in the chosen dtype, {dtype, fp32_ms, bf16_ms}).

    Auto on CPU loads the model twice, once per dtype (the fp32 one is never rounded in
    place), times both and drops the slower.
    """
    if precision == "fp32" or (precision == "auto" and device == "cpu"):
        model = load(torch.float32)
        if precision == "fp32":
            return model, {"dtype": "fp32"}
    else:
        return load(torch.bfloat16), {"dtype": "bf16"}
    fast = load(torch.bfloat16)
    fp32_ms, bf16_ms = forward_ms(model), forward_ms(fast)
    info = {"fp32_ms": round(fp32_ms, 1), "bf16_ms": round(bf16_ms, 1)}
    if bf16_wins(fp32_ms, bf16_ms):
        return fast, {"dtype": "bf16", **info}
    return model, {"dtype": "fp32", **info}


@torch.inference_mode()
def forward_ms(model: Any, reps: int = 2) -> float:
    """Best-of-`reps` ms of one [2, 64] prefill plus one batch-16 decode step on a 32-token
    cache: the two shapes a producer spends its time in (capture, regeneration)."""
    from specctl.target.engines import cache_kwarg, out_cache

    gen = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)
    prefill = torch.randint(0, vocab, (2, 64), generator=gen)
    step = torch.randint(0, vocab, (16, 1), generator=gen)
    context = model(input_ids=torch.randint(0, vocab, (16, 32), generator=gen), use_cache=True)
    cache = out_cache(context)
    best = float("inf")
    for _ in range(reps + 1):  # the first pass warms kernels and the allocator up
        t0 = time.perf_counter()
        model(input_ids=prefill, use_cache=False, logits_to_keep=1)
        model(input_ids=step, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
        best = min(best, time.perf_counter() - t0)
        cache.crop(-1)  # back to the 32-token context
    return best * 1000


def matmul_dtype(
    precision: str, device: str, hidden: int, vocab: int
) -> tuple[Any, dict[str, Any]]:
    """(dtype for a trainer's LM-head products or None for the weights' own, {dtype, ms...}).

    The products of a [rows, hidden] block with a [vocab, hidden] head are 60-70% of a CPU
    training step (bench_train). Auto on CPU times one such product in fp32 and bf16; GPUs
    keep the dtype `--precision` gave the weights.
    """
    if precision == "fp32" or (precision == "auto" and device != "cpu"):
        return None, {"dtype": "fp32" if precision == "fp32" else "weights"}
    if precision == "bf16":
        return torch.bfloat16, {"dtype": "bf16"}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen)
    ms = {"fp32": _mm_ms(x, w), "bf16": _mm_ms(x.bfloat16(), w.bfloat16())}
    info = {"fp32_ms": round(ms["fp32"], 2), "bf16_ms": round(ms["bf16"], 2)}
    # under a millisecond (test-sized heads) the ratio is noise and there is nothing to win
    if bf16_wins(ms["fp32"], ms["bf16"], MIN_MS):
        return torch.bfloat16, {"dtype": "bf16", **info}
    return None, {"dtype": "fp32", **info}


def _mm_ms(x: torch.Tensor, w: torch.Tensor, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps + 1):  # the first call warms the kernel up
        t0 = time.perf_counter()
        x @ w.t()
        best = min(best, time.perf_counter() - t0)
    return best * 1000
