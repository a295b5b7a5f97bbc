"""The sglang engine's last-hidden path, checked without SGLang: running only the target's last
decoder layer + final norm on the captured output of layer N-2 reproduces the full model."""

from __future__ import annotations

import pytest
import torch

from specctl.target.capture import HiddenCapture
from specctl.target.engines.hf import HFEngine
from specctl.target.engines.sglang import FinalTail, _rows
from tests.goldens.tiny_target import build_tiny_target, one_torch_thread

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)
pytestmark = pytest.mark.unit


def test_final_tail_equals_full_model(tmp_path) -> None:
    path = build_tiny_target(tmp_path)
    eng = HFEngine(path, device="cpu", aux_layers=[6, 7])
    tail = FinalTail(path, "cpu", torch.float32)
    assert tail.rotary.inv_freq.dtype == torch.float32
    ids = torch.tensor([list(range(3, 60))])
    with torch.inference_mode(), HiddenCapture(eng.model, [6, 7]) as cap:
        cap.base(input_ids=ids)
    h_final, last = tail(cap.aux[0][0])  # from the output of layer N-2 = 6
    assert torch.equal(h_final, cap.aux[1][0])  # layer N-1's output, pre-norm
    assert torch.equal(last, cap.last[0])  # post-norm last hidden


def test_rows_from_sglang_lists() -> None:
    got = _rows([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0]]], 3)  # one list per forward chunk
    assert got.dtype == torch.bfloat16 and got.tolist() == [[1, 2], [3, 4], [5, 6]]
    with pytest.raises(RuntimeError, match="radix cache"):
        _rows([[[1.0, 2.0]]], 2)
