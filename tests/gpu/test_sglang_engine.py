"""SGLang engine vs hf engine on the same prompts: same record layout, states within bf16 noise.

Needs a CUDA GPU and SGLang >= 0.5.23 (`pip install 'specctl[sglang]'`); skipped otherwise.
Both engines run the target in bf16 on the GPU, but with different kernels (SGLang's fused
ones vs HF's), so states agree to bf16 tolerance, not bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from specctl.pack import pack_record, record_nbytes, unpack_record
from specctl.target.data import load_prompts
from specctl.target.engines import SamplingParams
from specctl.target.models import resolve_model
from specctl.target.template import tokenize_conversation

pytestmark = pytest.mark.gpu


def _record(c, epoch: int, index: int, H: int):
    return unpack_record(
        pack_record(
            epoch=epoch,
            index=index,
            input_ids=torch.tensor(c.input_ids, dtype=torch.int32),
            loss_mask=torch.tensor(c.loss_mask, dtype=torch.uint8),
            aux_hidden=c.aux,
            last_hidden=c.last,
            out=torch.empty(
                record_nbytes(len(c.input_ids), H, len(c.aux), torch.bfloat16), dtype=torch.uint8
            ),
        )
    )


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    a, b = a.float(), b.float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.99, cos.min()
    rel = (a - b).norm() / b.norm()
    assert rel < 0.05, rel


def test_sglang_records_match_hf_records() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("sglang")
    from specctl.target.engines.hf import HFEngine
    from specctl.target.engines.sglang import SGLangEngine

    path = resolve_model("smollm2-135m")
    hf = HFEngine(path, device="cuda")
    prompts = load_prompts("chatterbot")[:6]
    samples = [tokenize_conversation(hf.tokenizer, p.messages) for p in prompts]
    want = hf.capture(samples)
    H = hf.hidden_size
    del hf
    torch.cuda.empty_cache()
    sg = SGLangEngine(path, mem_fraction_static=0.5)
    try:
        assert sg.aux_layers == [1, 14, 26]
        got = sg.capture(samples)
        greedy = sg.generate(
            [s.input_ids[:8] for s in samples[:2]], SamplingParams(max_new_tokens=4), [0, 1]
        )
        assert all(1 <= len(g) <= 4 for g in greedy)
    finally:
        sg.close()
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        rw, rg = _record(w, 0, i, H), _record(g, 0, i, H)
        hw, hg = rw.header, rg.header
        assert (hw.T, hw.H, hw.num_aux, hw.dtype_code, hw.flags, hw.total_nbytes) == (
            hg.T,
            hg.H,
            hg.num_aux,
            hg.dtype_code,
            hg.flags,
            hg.total_nbytes,
        )
        assert torch.equal(rw.input_ids, rg.input_ids) and torch.equal(rw.loss_mask, rg.loss_mask)
        for k in range(3):
            _close(rg.aux_hidden[:, k * H : (k + 1) * H], rw.aux_hidden[:, k * H : (k + 1) * H])
        _close(rg.last_hidden, rw.last_hidden)
