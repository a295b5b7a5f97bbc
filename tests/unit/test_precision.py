"""`--precision auto` keeps whichever dtype the model really runs faster in, and loses no fp32.

The timing is real: a forward hook slows one dtype's model by a fixed sleep per call, and
the choice must avoid it, whichever of the two it is.
"""

from __future__ import annotations

import time

import pytest
import torch

from specctl import precision
from specctl.errors import UsageError
from tests.models import tiny_llama

pytestmark = pytest.mark.unit


def _loader(slow: torch.dtype | None, calls: list[torch.dtype]):
    def load(dtype: torch.dtype):
        calls.append(dtype)
        model = tiny_llama(layers=2).to(dtype)
        if dtype == slow:
            model.register_forward_hook(lambda *_: time.sleep(0.03))
        return model

    return load


@pytest.mark.parametrize("slow", [torch.bfloat16, torch.float32])
def test_auto_avoids_the_slower_dtype(slow: torch.dtype) -> None:
    calls: list[torch.dtype] = []
    model, info = precision.pick_dtype(_loader(slow, calls), "auto", "cpu")
    kept = next(model.parameters()).dtype
    assert kept != slow and info["dtype"] == {torch.float32: "fp32", torch.bfloat16: "bf16"}[kept]
    assert calls == [torch.float32, torch.bfloat16]  # both loaded from source: no rounded copy
    assert info["fp32_ms"] > 0 and info["bf16_ms"] > 0
    # the timed passes leave the model usable
    with torch.inference_mode():
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 256)


def test_explicit_choices_load_once_and_time_nothing() -> None:
    for name, dtype, device in (
        ("fp32", torch.float32, "cpu"),
        ("bf16", torch.bfloat16, "cpu"),
        ("auto", torch.bfloat16, "cuda"),  # GPUs: bf16 without timing (loaded, not moved)
    ):
        calls: list[torch.dtype] = []
        model, info = precision.pick_dtype(_loader(None, calls), name, device)
        assert calls == [dtype] and next(model.parameters()).dtype == dtype
        assert info == {"dtype": name if name != "auto" else "bf16"}


def test_a_near_tie_keeps_fp32() -> None:
    """bf16 must win by the margin: equal speed keeps the exact fp32 states."""
    calls: list[torch.dtype] = []
    # both slowed by the same large sleep: the ratio is ~1 whatever the kernels do
    load = _loader(None, calls)

    def both_slow(dtype: torch.dtype):
        m = load(dtype)
        m.register_forward_hook(lambda *_: time.sleep(0.05))
        return m

    model, info = precision.pick_dtype(both_slow, "auto", "cpu")
    assert info["dtype"] == "fp32" and next(model.parameters()).dtype == torch.float32


def test_bad_choice_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--precision"):
        precision.parse("fp16")
    assert precision.parse("auto") == "auto"


def test_head_matmul_choice() -> None:
    """train-draft's LM-head products: explicit choices, GPUs untouched, and auto's answer
    agrees with the times it reports (on a SmolLM2-sized head, where there is something to win)."""
    assert precision.matmul_dtype("fp32", "cpu", 576, 8192)[0] is None
    assert precision.matmul_dtype("bf16", "cpu", 576, 8192)[0] is torch.bfloat16
    assert precision.matmul_dtype("auto", "cuda", 576, 8192) == (None, {"dtype": "weights"})
    # auto times both on a test-sized head (under a millisecond on an idle box: fp32 kept)
    # and a SmolLM2-sized one; its answer follows the rule on the times it reports (rounded
    # to 0.01 ms). Which dtype wins depends on the CPU and its load, so only the rule is checked
    for h, v in ((16, 64), (576, 8192)):
        dtype, info = precision.matmul_dtype("auto", "cpu", h, v)
        assert info["dtype"] == ("bf16" if dtype is torch.bfloat16 else "fp32")
        fp32, bf16, slack = info["fp32_ms"], info["bf16_ms"], 0.01
        if dtype is torch.bfloat16:
            assert fp32 >= precision.MIN_MS - slack and bf16 < precision.MARGIN * fp32 + slack
        else:
            assert fp32 < precision.MIN_MS + slack or bf16 >= precision.MARGIN * fp32 - slack
