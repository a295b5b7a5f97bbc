"""The verify cost curve is measured on the model at hand: a dear shape shows up and is skipped."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import LlamaForCausalLM

from specctl.evaluate import calibrate
from specctl.evaluate.specdec import CostModel, speculative_decode, target_decode
from specctl.evaluate.verifier import Verifier
from specctl.skinny import skinny_enabled
from tests.models import tiny_llama

pytestmark = pytest.mark.unit


def _tiny() -> LlamaForCausalLM:
    return tiny_llama(layers=2)


def test_cheap_shapes_pad_to_the_cheapest_longer_query() -> None:
    mkl = dict(enumerate((1.0, 1.65, 2.12, 1.46, 1.37, 1.41, 1.75, 1.37), start=1))
    assert calibrate.cheap_shapes(mkl) == (5, 8)  # 2-4 pad to 5, 6-7 to 8 (a tie keeps 5)
    flat = {q: 1.0 for q in range(1, 9)}  # a GPU: every q costs one step, nothing padded
    assert calibrate.cheap_shapes(flat) == tuple(range(2, 9))
    dear_3_and_7 = dict(enumerate((1.0, 1.06, 1.5, 1.38, 1.6, 1.8, 2.1, 1.98), start=1))
    assert calibrate.cheap_shapes(dear_3_and_7) == (2, 4, 5, 6, 8)


def test_measure_finds_a_dear_shape_and_leaves_the_verifier_clean() -> None:
    model = _tiny()
    ver = Verifier(model)

    def slow_q3(_mod, args, kwargs):  # q = 3 costs 100 ms more than any other query length
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] == 3:
            time.sleep(0.1)

    handle = model.register_forward_pre_hook(slow_q3, with_kwargs=True)
    curve = calibrate.measure(ver, torch.arange(5, 40), reps=5)
    handle.remove()
    assert len(curve.costs) == calibrate.MAX_Q and curve.costs[0] == 1.0 and curve.step_ms > 0
    assert curve.costs[2] == max(curve.costs)  # q=3 the dearest (a tiny forward is ~1 ms)
    assert 3 not in curve.shapes and 8 in curve.shapes  # 2 real positions never run at q=3
    assert ver.length == 0 and skinny_enabled(model)  # cache reset, skinny path restored

    ver.curve = calibrate.LiveCurve(curve)
    assert ver.verify_shapes == curve.shapes and ver.verify_costs == curve.costs
    cost = CostModel.of(ver)
    assert cost.verify(3) == min(curve.costs[2:])  # 2 drafts + 1 pad to the cheapest q >= 3
    ver.close()
    assert ver.curve is None and not skinny_enabled(model)


def test_measured_curve_keeps_greedy_output() -> None:
    model = _tiny()
    ver = Verifier(model)
    prompt = torch.arange(3, 30)
    ref = target_decode(ver, prompt, max_new_tokens=16)
    curve = calibrate.measure(ver, prompt, reps=1)
    ver.curve = calibrate.LiveCurve(calibrate.Curve(curve.costs, (4, 8), curve.step_ms, (), 1.0))
    # any padding: greedy text is the target's

    class Shifted:  # proposes the target's own next tokens, the 3rd one wrong
        name, needs_aux = "shifted", False

        def start(self, prompt, aux, first):
            self.pos = 1

        def propose(self, k, temperature, gen):
            from specctl.evaluate.specdec import Proposal

            toks = list(ref.tokens[self.pos : self.pos + k])
            if len(toks) >= 3:
                toks[2] = (toks[2] + 1) % 256
            return Proposal(torch.tensor(toks, dtype=torch.long))

        def advance(self, tokens, aux):
            self.pos += tokens.numel()

    out = speculative_decode(ver, Shifted(), prompt, k=5, max_new_tokens=16)
    assert out.tokens == ref.tokens and max(out.accepted) == 2


def test_each_query_length_takes_the_faster_path() -> None:
    """Skinny linears only where they measured faster: slowed at q=2, F.linear slowed at q=5."""
    from specctl.skinny import ALL_ROWS, default_rows, set_default_rows, skinny_rows

    model = _tiny()
    ver = Verifier(model)

    def slow(_mod, args, kwargs):
        q = kwargs["input_ids"].shape[-1]
        if (q == 2 and skinny_enabled(model)) or (q == 5 and not skinny_enabled(model)):
            time.sleep(0.1)

    handle = model.register_forward_pre_hook(slow, with_kwargs=True)
    try:
        curve = calibrate.measure(ver, torch.arange(5, 40), reps=3)
    finally:
        handle.remove()
    assert 2 not in curve.skinny_rows and 5 in curve.skinny_rows
    assert curve.costs[1] < curve.costs[4] + 1  # each q's cost is its faster path's
    try:
        calibrate.apply(ver, curve)
        assert skinny_rows(model) == frozenset(curve.skinny_rows) == default_rows()
    finally:
        set_default_rows(ALL_ROWS)
    ver.close()
    assert skinny_rows(model) == frozenset()


def test_the_curve_follows_the_verifies_timed_while_decoding() -> None:
    """A curve that measured q = 3 cheap is corrected once decoding times q = 3 dear: after a
    few rounds the cost model prices it right and stops padding to it."""
    model = _tiny()
    ver = Verifier(model)
    prompt = torch.arange(3, 30)
    curve = calibrate.measure(ver, prompt, reps=1)
    cheap3 = list(curve.costs)
    cheap3[2] = 0.5  # the misreading: q = 3 at half a step
    live = calibrate.LiveCurve(calibrate.Curve(tuple(cheap3), (3, 8), curve.step_ms, (), 1.0))
    ver.curve = live
    cost = CostModel.of(ver)
    assert cost.verify(3) == 0.5 and 3 in ver.verify_shapes

    def slow_q3(_mod, args, kwargs):  # the truth: q = 3 takes 50 ms more than the rest
        if kwargs["input_ids"].shape[-1] == 3:
            time.sleep(0.05)

    handle = model.register_forward_pre_hook(slow_q3, with_kwargs=True)
    try:
        ver.reset()
        ver.forward(prompt)  # a prefill is not observed (only decode-sized forwards are)
        assert live.observed == 0
        for _ in range(6):  # three priors per q: four real timings outvote them
            for q in (1, 3):
                ver.forward(prompt[:q])
                ver.crop(q)
    finally:
        handle.remove()
    assert live.observed == 12
    assert live.costs[2] > 10 and 3 not in ver.verify_shapes  # ~50 steps of a ~1 ms forward
    assert cost.verify(3) == min(live.costs[2:])  # 3 real positions now pad past q = 3
    ver.close()
