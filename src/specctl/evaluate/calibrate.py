"""The verify cost curve of the machine at hand, measured in a few seconds.

What a q-token target forward costs relative to a decode step (q = 1) decides two things:
which query lengths a verify is padded to (`verify_len`) and how long a chain is worth
proposing (`specdec.CostModel`). The curve depends on the CPU, its thread count and the GEMM
path (skinny linears or MKL), so constants measured on one box mislead on another: with 2
threads here q = 2 costs 1.06 steps, with 1 thread q = 4 can be the cheap shape, on a GPU the
curve is flat. `measure` times every q on the real model and cache before decoding starts.

A few seconds of timing are noisy here (10-25% per q between back-to-back runs, once q = 3
at 0.98 steps when it costs 1.18), and one low value misleads the cost model for a whole
run. So the measured curve is only the start: `LiveCurve` keeps the latest verify times per
q (the verifier times every chain forward of <= MAX_Q positions while decoding) and the
costs and cheap shapes follow their medians.
"""

from __future__ import annotations

import random
import statistics
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from specctl.evaluate.verifier import Verifier

MAX_Q = 8  # verify shapes considered: k <= 7 draft tokens (+1 for the verified position)


@dataclass(frozen=True)
class Curve:
    """A verify of q = 1..MAX_Q positions in decode steps, the q's worth padding to, and the
    q's whose forward is faster through the skinny linears than through `F.linear`."""

    costs: tuple[float, ...]
    shapes: tuple[int, ...]
    step_ms: float  # one decode step (q = 1), the unit
    skinny_rows: tuple[int, ...]
    step_ms_f_linear: float  # the q = 1 step through F.linear, for the report


def forward_ms(
    verifier: Verifier,
    context: torch.Tensor,
    reps: int,
    paths: Iterable[bool] = (True,),
    seed: int = 0,
) -> dict[tuple[bool, int], float]:
    """Median ms of a q-token forward on `context`'s cache, {(skinny, q): ms}.

    Every (path, q) cell is timed `reps` times in one shuffled order, so load drift hits all
    alike; each timed forward is cropped away. One untimed pass first (first-call setup). The
    verifier's cache is reset afterwards and its own path restored.
    """
    from specctl.skinny import use_skinny_linears

    verifier.reset()
    verifier.forward(context)
    n0 = verifier.length
    cells = [(sk, q) for sk in paths for q in range(1, MAX_Q + 1)]
    timed = cells * reps
    random.Random(seed).shuffle(timed)
    order = cells + timed  # the first pass is the warm-up
    ids = context[-MAX_Q:].repeat(MAX_Q)[:MAX_Q]  # real token ids, enough for any q
    times: dict[tuple[bool, int], list[float]] = {c: [] for c in cells}
    own = verifier.skinny
    try:
        for i, (sk, q) in enumerate(order):
            use_skinny_linears(verifier.model, sk)
            t = time.perf_counter()
            logits, _ = verifier.forward(ids[:q], aux=True)
            logits.argmax(-1)
            if i >= len(cells):
                times[(sk, q)].append(time.perf_counter() - t)
            verifier.crop(verifier.length - n0)
    finally:
        use_skinny_linears(verifier.model, own)
        verifier.reset()
    return {c: statistics.median(ts) * 1e3 for c, ts in times.items()}


def cheap_shapes(ms: dict[int, float]) -> tuple[int, ...]:
    """The cheapest q >= n for every n >= 2 real positions: the shapes worth padding to."""
    top = max(ms)
    return tuple(sorted({min(range(n, top + 1), key=ms.__getitem__) for n in range(2, top + 1)}))


def measure(verifier: Verifier, context: torch.Tensor, reps: int = 5) -> Curve:
    """The curve of this machine (6-9 s for a 135M model on 2 cores): with skinny linears
    allowed, every q is timed both ways and takes the faster (on an AMX Xeon F.linear wins
    at every q, on the AMD EPYC of docs/benchmarks.md skinny won everywhere)."""
    if context.numel() < 1:
        raise ValueError("calibration needs a non-empty context")
    paths = (True, False) if verifier.skinny else (False,)
    return curve_of(forward_ms(verifier, context, reps, paths))


def curve_of(ms: dict[tuple[bool, int], float]) -> Curve:
    """The curve of `forward_ms` timings: each q on its faster path (skinny only where timed)."""
    qs = range(1, MAX_Q + 1)
    rows = tuple(q for q in qs if (True, q) in ms and ms[(True, q)] < ms[(False, q)])
    best = {q: ms[(q in rows, q)] for q in qs}
    costs = tuple(round(best[q] / best[1], 3) for q in qs)
    f_step = round(ms[(False, 1)], 3)
    return Curve(costs, cheap_shapes(best), round(best[1], 3), rows, f_step)


class LiveCurve:
    """Verify costs from the latest `window` timed forwards of each q (medians), seeded with
    a measured curve worth `prior` forwards per q. `costs` and `shapes` are recomputed on
    each observation, so the cost model reads them at no cost per call."""

    def __init__(self, curve: Curve, window: int = 32, prior: int = 3) -> None:
        self._ms = {
            q: deque([c * curve.step_ms] * prior, maxlen=window)
            for q, c in enumerate(curve.costs, start=1)
        }
        self.observed = 0
        self._update()

    def observe(self, q: int, ms: float) -> None:
        if q in self._ms:
            self._ms[q].append(ms)
            self.observed += 1
            self._update()

    def _update(self) -> None:
        med = {q: statistics.median(d) for q, d in self._ms.items()}
        self.costs = tuple(round(med[q] / med[1], 3) for q in sorted(med))
        self.shapes = cheap_shapes(med)


def apply(verifier: Verifier, curve: Curve) -> None:
    """Decode with what was measured: the verifier's cost curve (refined by the verifies it
    times while decoding, `LiveCurve`) and cheap shapes, skinny linears for the chosen q's
    only, and the same rows for the draft's own matmuls (its layer has the target's shapes;
    `skinny.set_default_rows`)."""
    from specctl.skinny import set_default_rows, use_skinny_linears

    verifier.curve = LiveCurve(curve)
    if verifier.skinny:
        use_skinny_linears(verifier.model, True, curve.skinny_rows)
        set_default_rows(curve.skinny_rows)
