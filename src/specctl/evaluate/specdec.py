"""Speculative decoding, read top to bottom: one function, numbered steps, shape comments.

One round: the drafter proposes up to k tokens, the target verifies them in ONE forward over
its KV cache, the longest acceptable prefix plus one target token is emitted, and both
caches roll back to the emitted text. Batch size 1.

- Greedy (temperature 0) accepts a draft token iff it equals the target's argmax, so the
  output is exactly the target's own greedy text; `target_decode` is that reference.
- Temperature > 0 uses the standard speculative sampling rule (Leviathan et al., Chen et al.):
  accept d with probability min(1, p(d)/q(d)), on rejection sample from norm(max(0, p - q)),
  after k acceptances sample a bonus token from p. The output is distributed as the target's.
- The verify query is padded to cheap GEMM shapes (`verify_len`; eval-accept times the
  curve on the machine at hand before decoding, `calibrate.py`). Here, with the target's
  skinny linears (the default, `specctl.skinny`), a q-token forward costs about 1.05 /
  1.35 / 1.35 / 1.6 decode steps for q = 2..5, so only 3 -> 4 and 7 -> 8 are padded
  (VERIFY_SHAPES, the stored curve); with MKL's own `F.linear`
  q = 2, 3, 7 cost 1.6-2x a step and q = 5 only 1.37x, so everything pads to 5 or 8
  (VERIFY_SHAPES_MKL). Padding sits after the real positions, so the causal mask keeps it
  from touching their logits; it is cropped away. A round proposing nothing (adaptive k, no
  prompt-lookup match) verifies at q=1, a plain decode step.
- Cost-aware length (`CostModel`, given to a drafter as `drafter.cost`): a chain drafter
  knows its cumulative confidences (the draft is calibrated, so they estimate P(accepted));
  it stops drafting once no further token could be worth verifying and proposes the length
  n that maximises expected emitted tokens 1 + conf_1 + ... + conf_n per unit of round time
  (verify cost of the padded q, `Verifier.verify_costs`, plus draft steps). With skinny
  linears q=2 costs 1.06 steps and q=3 1.36, so a one-token guess pays at ~10% confidence
  while a second one needs ~30%: one threshold cannot say both. The rule reads only the
  draft's outputs, so greedy output stays identical and sampling unbiased.
- Time accounting: `draft_s` (propose + advance), `verify_s` (the target forward); the rest
  of a round (accept, emit, crop) is bookkeeping overhead, reported per round by eval-accept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from specctl.evaluate.verifier import VERIFY_SHAPES, Verifier


@dataclass
class Proposal:
    """Draft tokens (target ids) and, when sampled, the draft distributions they came from."""

    tokens: torch.Tensor  # [k'] int64, k' <= k (may be 0)
    probs: torch.Tensor | None = None  # [k', V] draft distribution per token; None = deterministic
    conf: list[float] | None = None  # [k'] cumulative draft confidence (chain drafters)


class Drafter(Protocol):
    """What the loop needs from a drafter. `aux` is None unless `needs_aux`."""

    name: str
    needs_aux: bool

    def start(self, prompt: torch.Tensor, aux: torch.Tensor | None, first: int) -> None:
        """After the target prefill: prompt [T], aux [T, k*H], first = the token the target emitted."""

    def propose(self, k: int, temperature: float, gen: torch.Generator | None) -> Proposal:
        """Up to k tokens continuing the text so far."""

    def advance(self, tokens: torch.Tensor, aux: torch.Tensor | None) -> None:
        """tokens [n+1] were emitted; aux [n+1, k*H] are the target states that predicted them."""


@dataclass
class DecodeResult:
    """One prompt's decode. `emitted[r]` = tokens emitted by verify round r (AL numerator)."""

    tokens: list[int]
    prefill_s: float
    total_s: float
    emitted: list[int] = field(default_factory=list)  # per round
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted per round
    proposed: list[int] = field(default_factory=list)  # draft tokens proposed per round
    draft_s: float = 0.0
    verify_s: float = 0.0

    @property
    def rounds(self) -> int:
        return len(self.emitted)


def verify_len(n_real: int, pad: bool = True, shapes: tuple[int, ...] = VERIFY_SHAPES) -> int:
    """The query length to run for n_real real positions: the next cheap shape.

    `shapes` come from the verify curve of the machine at hand (`calibrate.measure`; with
    1 thread q=4 can be the cheap one); a round with nothing proposed runs at q=1.
    """
    if not pad or n_real == 1:
        return n_real
    for q in sorted(shapes):
        if n_real <= q:
            return q
    return n_real


DRAFT_STEP_COST = 0.05  # one draft step in target decode steps (8k-vocab EAGLE-3 here: ~0.046)


@dataclass(frozen=True)
class CostModel:
    """A round's cost in target decode steps: the verify of n real positions, padded to the
    next cheap shape, plus the draft steps taken (see the module docstring)."""

    costs: tuple[float, ...]  # verify of q = 1, 2, ... positions
    shapes: tuple[int, ...]  # the cheap q's the loop pads to
    pad: bool = True
    step: float = DRAFT_STEP_COST
    # a `calibrate.LiveCurve` (the verifier's, refined while decoding): its costs, and its
    # shapes when `live_shapes`, replace the fixed ones at every call
    live: Any = field(default=None, compare=False)
    live_shapes: bool = False

    @classmethod
    def of(
        cls, verifier: Verifier, pad: bool = True, shapes: tuple[int, ...] | None = None
    ) -> CostModel:
        live = verifier.curve
        return cls(
            verifier.verify_costs,
            shapes or verifier.verify_shapes,
            pad,
            live=live,
            live_shapes=live is not None and shapes is None,
        )

    def verify(self, n_real: int) -> float:
        costs, shapes = self.costs, self.shapes
        if self.live is not None:
            costs = self.live.costs
            shapes = self.live.shapes if self.live_shapes else shapes
        q = verify_len(n_real, self.pad, shapes)
        return costs[q - 1] if q <= len(costs) else costs[-1] * q / len(costs)

    def rate(self, conf: list[float], drafted: int = 0) -> float:
        """Expected emitted tokens per decode step of a round proposing len(conf) tokens."""
        return (1.0 + sum(conf)) / (self.verify(len(conf) + 1) + drafted * self.step)

    def best_length(self, conf: list[float], drafted: int | None = None) -> int:
        """How many of a drafted chain to propose: the prefix with the best `rate` (the
        chain's draft steps are spent whatever the length: the same for every prefix)."""
        spent = len(conf) if drafted is None else drafted
        rates = [self.rate(conf[:n], spent) for n in range(len(conf) + 1)]
        return max(range(len(rates)), key=rates.__getitem__)

    def worth_drafting(self, conf: list[float], k: int) -> bool:
        """Whether another draft step is likely to lengthen the best proposal: the next tokens
        are guessed as sure as the last one was (its conditional confidence, repeated)."""
        if not conf or len(conf) >= k:
            return len(conf) < k
        p = conf[-1] / conf[-2] if len(conf) > 1 else conf[0]
        hope = conf + [conf[-1] * p**i for i in range(1, k - len(conf) + 1)]
        return self.best_length(hope, drafted=k) > len(conf)


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=-1)


def _pick(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    return int(torch.multinomial(_probs(logits, temperature), 1, generator=gen))


def accept_sampled(
    p: torch.Tensor, q: torch.Tensor | None, draft: torch.Tensor, gen: torch.Generator | None
) -> tuple[int, int]:
    """The speculative sampling rule. p [k+1, V] target probs, q [k, V] | None (one-hot), draft [k].

    Returns (n accepted, next token): the next token is the residual sample at the first
    rejection, or the bonus sample from p[k] when all k are accepted.
    """
    k = draft.numel()
    for i in range(k):
        d = int(draft[i])
        qd = 1.0 if q is None else float(q[i, d])
        # 1. accept with probability min(1, p(d)/q(d))
        if qd > 0 and float(torch.rand((), generator=gen)) < min(1.0, float(p[i, d]) / qd):
            continue
        # 2. rejected: sample from norm(max(0, p - q))
        q_i = torch.zeros_like(p[i]) if q is None else q[i]
        if q is None:
            q_i[d] = 1.0
        resid = (p[i] - q_i).clamp_min(0)
        if float(resid.sum()) <= 0:  # p == q: rejection had probability 0; guard rounding
            resid = p[i]
        return i, int(torch.multinomial(resid / resid.sum(), 1, generator=gen))
    return k, int(torch.multinomial(p[k], 1, generator=gen))


def _accept_greedy(logits: torch.Tensor, draft: torch.Tensor) -> tuple[int, list[int]]:
    """logits [k+1, V], draft [k] -> (n, the n+1 emitted tokens).

    Greedy accepts exactly the prefix where the draft equals the target argmax, so the emitted
    tokens are the argmax rows 0..n themselves: one argmax, one .tolist(), no per-token loop.
    """
    target = logits.argmax(dim=-1)  # [k+1]
    n = int((target[: draft.numel()] == draft).cumprod(0).sum())
    return n, target[: n + 1].tolist()


def speculative_decode(
    verifier: Verifier,
    drafter: Drafter,
    prompt: torch.Tensor,
    *,
    k: int,
    max_new_tokens: int,
    eos_ids: tuple[int, ...] = (),
    temperature: float = 0.0,
    pad_verify: bool = True,
    verify_shapes: tuple[int, ...] | None = None,
    gen: torch.Generator | None = None,
) -> DecodeResult:
    """Decode `max_new_tokens` after `prompt` [T] with draft-then-verify rounds.

    A drafter may propose fewer than k tokens (adaptive k, prompt lookup without a match);
    the verify still runs at the next cheap shape for what was proposed.
    """
    t0 = time.perf_counter()
    # 1. Prefill the target on the prompt; it emits the first token itself.
    verifier.reset()
    logits, aux = verifier.forward(prompt, aux=drafter.needs_aux)  # [T, V], [T, k*H]
    out = [_pick(logits[-1], temperature, gen)]
    prefill_s = time.perf_counter() - t0
    res = DecodeResult(tokens=out, prefill_s=prefill_s, total_s=0.0)
    t = time.perf_counter()
    drafter.start(prompt, aux, out[0])  # the draft prefills on (x_{t+1}, g_t) pairs
    res.draft_s += time.perf_counter() - t
    shapes = verify_shapes or verifier.verify_shapes  # the cheap q's of the verifier's curve
    q_max = verify_len(k + 1, pad_verify, shapes)
    ids_buf = torch.empty(q_max, dtype=torch.long)  # [q_max], refilled every round
    while len(out) < max_new_tokens and out[-1] not in eos_ids:
        # 2. Draft up to k tokens (never past max_new_tokens: the last round would waste them).
        t = time.perf_counter()
        prop = drafter.propose(min(k, max_new_tokens - len(out)), temperature, gen)
        draft = prop.tokens  # [k'], k' <= k
        res.draft_s += time.perf_counter() - t
        # 3. Verify: ONE target forward over [last, d_1..d_k', last...] -> logits [q, V].
        t = time.perf_counter()
        n_real = draft.numel() + 1
        q_len = verify_len(n_real, pad_verify, shapes)
        ids_buf[0] = out[-1]
        ids_buf[1:n_real] = draft
        ids_buf[n_real:q_len] = ids_buf[n_real - 1]  # padding: causal tail, never read
        logits, aux = verifier.forward(ids_buf[:q_len], aux=drafter.needs_aux)  # [q, V], [q, kH]
        res.verify_s += time.perf_counter() - t
        # 4. Accept the longest valid prefix n, plus one token from the target.
        logits = logits[:n_real]  # [k'+1, V]: padding rows are never read
        if temperature <= 0:
            n, new = _accept_greedy(logits, draft)  # n+1 tokens
        else:
            n, nxt = accept_sampled(_probs(logits, temperature), prop.probs, draft, gen)
            new = [*draft[:n].tolist(), nxt]
        # 5. Emit, stopping at the token budget or an EOS.
        new = new[: max_new_tokens - len(out)]
        stop = next((j for j, tok in enumerate(new) if tok in eos_ids), len(new) - 1)
        new = new[: stop + 1]
        out.extend(new)
        res.emitted.append(len(new))
        res.accepted.append(n)
        res.proposed.append(n_real - 1)
        if len(out) >= max_new_tokens or out[-1] in eos_ids:
            break
        # 6. Roll back: the target keeps [last, d_1..d_n]; the draft re-reads them with target states.
        verifier.crop(q_len - (n + 1))
        t = time.perf_counter()
        drafter.advance(torch.tensor(new), None if aux is None else aux[: n + 1])
        res.draft_s += time.perf_counter() - t
    res.total_s = time.perf_counter() - t0
    return res


def target_decode(
    verifier: Verifier,
    prompt: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_ids: tuple[int, ...] = (),
    temperature: float = 0.0,
    gen: torch.Generator | None = None,
) -> DecodeResult:
    """The target alone: prefill, then one q=1 forward per token (the lossless reference)."""
    t0 = time.perf_counter()
    verifier.reset()
    logits, _ = verifier.forward(prompt)  # [T, V]
    out = [_pick(logits[-1], temperature, gen)]
    res = DecodeResult(tokens=out, prefill_s=time.perf_counter() - t0, total_s=0.0)
    while len(out) < max_new_tokens and out[-1] not in eos_ids:
        t = time.perf_counter()
        logits, _ = verifier.forward(torch.tensor([out[-1]]))  # [1, V]
        out.append(_pick(logits[-1], temperature, gen))
        res.verify_s += time.perf_counter() - t
        res.emitted.append(1)
        res.accepted.append(0)
        res.proposed.append(0)
    res.total_s = time.perf_counter() - t0
    return res
