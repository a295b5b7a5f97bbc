"""The CUDA gather/cast kernel (csrc/pack_cuda.cu) writes the torch path's bytes exactly."""

from __future__ import annotations

import pytest
import torch

from specctl import pack

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SPECIAL_BITS = [0x7FC00000, 0xFFC00000, 0x7F800001, 0x7F800000, 0xFF800000, 0x80000000,
                0x00000001, 0x007FFFFF, 0x3F808000, 0x3F818000, 0x7F7FFFFF]  # fmt: skip


def states(T, H, n, seed):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(T, H, generator=g) for _ in range(n)]
    bits = torch.tensor(SPECIAL_BITS, dtype=torch.int64).to(torch.int32).view(torch.float32)
    for s in out:
        s.view(-1)[: min(T * H, bits.numel())] = bits[: min(T * H, bits.numel())]
    return out


def test_cuda_kernel_is_built():
    assert pack._cuda_lib() is not None, "specctl/_pack_cuda*.so missing: nvcc build failed?"


@pytest.mark.parametrize(
    "T,H,k", [(1, 1, 1), (7, 33, 3), (64, 576, 3), (513, 4096, 3), (9, 100, 0)]
)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("has_last", [True, False])
def test_cuda_pack_equals_torch_pack(monkeypatch, T, H, k, in_dtype, dtype, has_last):
    if k == 0 and not has_last:
        pytest.skip("a record needs aux or last")
    cpu = [s.to(in_dtype) for s in states(T, H, k + 1, seed=T + H)]
    ids, mask = torch.arange(T), torch.arange(T) % 3 == 0
    aux_cpu, last_cpu = cpu[:k] or None, cpu[k] if has_last else None
    monkeypatch.setenv("SPECCTL_PACK", "torch")
    ref = pack.pack_record(epoch=4, index=5, input_ids=ids, loss_mask=mask, aux_hidden=aux_cpu,
                           last_hidden=last_cpu, dtype=dtype)  # fmt: skip
    monkeypatch.setenv("SPECCTL_PACK", "native")
    gpu = [s.cuda() for s in cpu]
    got = pack.pack_record(epoch=4, index=5, input_ids=ids.cuda(), loss_mask=mask.cuda(),
                           aux_hidden=gpu[:k] or None, last_hidden=gpu[k] if has_last else None,
                           dtype=dtype)  # fmt: skip
    assert torch.equal(ref, got)
    pack.unpack_record(got)


def test_cuda_pack_strided_views_and_out_buffer(monkeypatch):
    T, H = 100, 256
    hidden = torch.randn(4, 2, T, 2 * H)  # [layers, B, T, 2H]
    views = [hidden[i, 1, :, ::2] for i in range(4)]  # inner stride 2: made contiguous
    rows = [hidden[i, 0, :, :H] for i in range(4)]  # row stride 2H
    ids, mask = torch.arange(T), torch.ones(T, dtype=torch.bool)
    for srcs in (views, rows):
        monkeypatch.setenv("SPECCTL_PACK", "torch")
        ref = pack.pack_record(epoch=0, index=1, input_ids=ids, loss_mask=mask,
                               aux_hidden=srcs[:3], last_hidden=srcs[3])  # fmt: skip
        monkeypatch.setenv("SPECCTL_PACK", "native")
        dev = hidden.cuda()
        gsrcs = (
            [dev[i, 1, :, ::2] for i in range(4)]
            if srcs is views
            else [dev[i, 0, :, :H] for i in range(4)]
        )
        out = torch.full((ref.numel() + 64,), 0xCD, dtype=torch.uint8).pin_memory()
        got = pack.pack_record(epoch=0, index=1, input_ids=ids, loss_mask=mask,
                               aux_hidden=gsrcs[:3], last_hidden=gsrcs[3], out=out)  # fmt: skip
        assert torch.equal(ref, got)
