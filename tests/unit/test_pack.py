"""pack/unpack: round trips on both backends, native == torch byte for byte, fuzzing."""

from __future__ import annotations

import shutil

import crc32c as crc32c_pkg
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specctl import pack, protocol
from specctl.errors import RecordError

pytestmark = pytest.mark.unit
FAST = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    pack._native_lib() is None, reason="native pack library not built"))]  # fmt: skip

# fp32 bit patterns that stress the bf16 rounding: NaNs with payloads and signs, ±inf,
# ±0, denormals, ties to even (up and down), the largest finite value (rounds to inf).
SPECIAL_BITS = [
    0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FBFFFFF, 0x7F800000, 0xFF800000,
    0x00000000, 0x80000000, 0x00000001, 0x007FFFFF, 0x80008000, 0x00018000, 0x3F808000,
    0x3F818000, 0x3F807FFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x3F800001,
]  # fmt: skip


def use(monkeypatch, backend: str) -> None:
    monkeypatch.setenv("SPECCTL_PACK", backend)
    assert pack.backend() == backend


def sample(T, H, k, in_dtype=torch.float32, has_last=True, seed=0, special=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50_000, (T,), generator=g)
    mask = torch.rand(T, generator=g) > 0.3
    states = [torch.randn(T, H, generator=g) * 3 for _ in range(k + 1)]
    if special:  # sprinkle the special bit patterns over every state
        bits = torch.tensor(SPECIAL_BITS, dtype=torch.int64).to(torch.int32).view(torch.float32)
        for s in states:
            pos = torch.randint(0, T * H, (min(T * H, 40),), generator=g)
            s.view(-1)[pos] = bits[torch.arange(pos.numel()) % bits.numel()]
    states = [s.to(in_dtype) for s in states]
    return ids, mask, states[:k], (states[k] if has_last else None)


def pack_both(monkeypatch, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    use(monkeypatch, "torch")
    ref = pack.pack_record(**kw).clone()
    use(monkeypatch, "native")
    return ref, pack.pack_record(**kw).clone()


def expected_bits(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Independent RNE reference in int64 arithmetic (NaN -> 0x7FC0)."""
    if dtype == torch.float32 or x.dtype == dtype:
        return x.to(dtype)
    u = x.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = torch.where((u & 0x7FFFFFFF) > 0x7F800000, torch.full_like(r, 0x7FC0), r)
    return r.to(torch.int32).to(torch.int16).view(torch.bfloat16)


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(
    T=st.integers(1, 40),
    H=st.integers(1, 70),
    k=st.integers(0, 4),
    has_last=st.booleans(),
    in_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    as_list=st.booleans(),
    epoch=st.integers(0, 2**32 - 1),
    index=st.integers(0, 2**32 - 1),
)
def test_round_trip(
    monkeypatch, backend, T, H, k, has_last, in_dtype, dtype, as_list, epoch, index
):
    use(monkeypatch, backend)
    has_last = has_last or k == 0
    ids, mask, aux, last = sample(T, H, k, in_dtype, has_last, seed=T * H + k, special=True)
    aux_arg = None if not k else aux if as_list else torch.cat(aux, dim=1)
    buf = pack.pack_record(epoch=epoch, index=index, input_ids=ids, loss_mask=mask,
                           aux_hidden=aux_arg, last_hidden=last, dtype=dtype, num_aux=k or None)  # fmt: skip
    assert buf.numel() == pack.record_nbytes(T, H, k, dtype, has_last)
    rec = pack.unpack_record(buf)
    assert (rec.epoch, rec.index, rec.header.T, rec.header.H) == (epoch, index, T, H)
    assert torch.equal(rec.input_ids, ids.int())
    assert torch.equal(rec.loss_mask, mask.to(torch.uint8))
    if k:
        assert rec.aux_hidden is not None and rec.aux_hidden.dtype == dtype
        want = torch.cat([expected_bits(a, dtype) for a in aux], dim=1)
        assert torch.equal(rec.aux_hidden.view(torch.uint8), want.view(torch.uint8))
    else:
        assert rec.aux_hidden is None
    if has_last:
        assert rec.last_hidden is not None
        assert torch.equal(
            rec.last_hidden.view(torch.uint8), expected_bits(last, dtype).view(torch.uint8)
        )
    else:
        assert rec.last_hidden is None


@pytest.mark.skipif(pack._native_lib() is None, reason="native pack library not built")
@FAST
@given(
    T=st.integers(1, 64),
    H=st.integers(1, 130),
    k=st.integers(0, 4),
    in_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    has_last=st.booleans(),
)
def test_native_equals_torch_byte_for_byte(monkeypatch, T, H, k, in_dtype, dtype, has_last):
    has_last = has_last or k == 0
    ids, mask, aux, last = sample(T, H, k, in_dtype, has_last, seed=7 * T + H, special=True)
    kw = dict(epoch=3, index=9, input_ids=ids, loss_mask=mask, aux_hidden=aux or None,
              last_hidden=last, dtype=dtype)  # fmt: skip
    ref, nat = pack_both(monkeypatch, **kw)
    assert torch.equal(ref, nat)


@pytest.mark.skipif(pack._native_lib() is None, reason="native pack library not built")
def test_native_equals_torch_on_strided_and_mixed_inputs(monkeypatch):
    T, H = 33, 48
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 2, T, H, generator=g)  # [layers, B, T, H]: views of one sample
    aux_views = [hidden[i, 1] for i in range(3)]
    transposed = torch.randn(H, T, generator=g).t()  # inner stride != 1
    row_strided = torch.randn(T, 2 * H, generator=g)[:, ::2]  # inner stride 2
    wide = torch.randn(T, 5 * H, generator=g)[:, H : 4 * H]  # [T, 3H] slice, row stride 5H
    cases = [
        dict(aux_hidden=aux_views, last_hidden=hidden[3, 1]),
        dict(aux_hidden=[transposed, row_strided, aux_views[0]], last_hidden=transposed),
        dict(aux_hidden=wide, last_hidden=row_strided),
        dict(aux_hidden=[aux_views[0].bfloat16(), aux_views[1]], last_hidden=None),  # mixed
        dict(aux_hidden=[aux_views[0].half()], last_hidden=transposed),  # fp16 input
        dict(aux_hidden=None, last_hidden=hidden[3, 0].bfloat16()),
    ]
    ids, mask = torch.arange(T), torch.ones(T, dtype=torch.bool)
    for dtype in (torch.bfloat16, torch.float32):
        for case in cases:
            ref, nat = pack_both(monkeypatch, epoch=0, index=1, input_ids=ids, loss_mask=mask,
                                 dtype=dtype, **case)  # fmt: skip
            assert torch.equal(ref, nat)


@pytest.mark.skipif(pack._native_lib() is None, reason="native pack library not built")
def test_any_nonzero_mask_is_written_as_one_by_both_packers(monkeypatch):
    # uint8 masks reach the packers as they are (no per-record torch pass): both must
    # still write 0/1, and the same bytes
    T, H = 9, 16
    raw = torch.tensor([0, 1, 2, 255, 0, 7, 1, 0, 128], dtype=torch.uint8)
    aux = [torch.randn(T, H) for _ in range(3)]
    for mask in (raw, raw.to(torch.int64), raw.float() * 0.5, raw.bool()):
        kw = dict(epoch=0, index=0, input_ids=torch.arange(T), loss_mask=mask,
                  aux_hidden=aux, last_hidden=aux[0])  # fmt: skip
        ref, nat = pack_both(monkeypatch, **kw)
        assert torch.equal(ref, nat)
        assert pack.unpack_record(nat).loss_mask.tolist() == (raw != 0).to(torch.uint8).tolist()
    assert raw.tolist()[:4] == [0, 1, 2, 255]  # the caller's tensor is not normalised in place


@pytest.mark.skipif(pack._native_lib() is None, reason="native pack library not built")
@pytest.mark.parametrize("threads", ["1", "3", "8"])
def test_multithreaded_pack_keeps_crcs_exact(monkeypatch, threads):
    monkeypatch.setenv("SPECCTL_PACK_THREADS", threads)
    ids, mask, aux, last = sample(301, 257, 3, special=True)
    kw = dict(epoch=1, index=2, input_ids=ids, loss_mask=mask, aux_hidden=aux, last_hidden=last)
    ref, nat = pack_both(monkeypatch, **kw)
    assert torch.equal(ref, nat)
    pack.unpack_record(nat)  # the threaded verify agrees too


@pytest.mark.skipif(pack._native_lib() is None, reason="native pack library not built")
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_large_unaligned_record(monkeypatch, in_dtype):
    # H=1031 makes every row start unaligned; the streaming-store path runs in test_pack_isa.
    ids, mask, aux, last = sample(1024, 1031, 3, in_dtype, special=True)
    kw = dict(epoch=1, index=2, input_ids=ids, loss_mask=mask, aux_hidden=aux, last_hidden=last)
    ref, nat = pack_both(monkeypatch, **kw)
    assert nat.numel() > 8 << 20
    assert torch.equal(ref, nat)


def test_out_buffer_is_filled_in_place(monkeypatch):
    for backend in ["torch", "native"] if pack._native_lib() else ["torch"]:
        use(monkeypatch, backend)
        ids, mask, aux, last = sample(9, 16, 3)
        kw = dict(epoch=0, index=0, input_ids=ids, loss_mask=mask, aux_hidden=aux, last_hidden=last)
        fresh = pack.pack_record(**kw)
        out = torch.full((fresh.numel() + 100,), 0xAB, dtype=torch.uint8)  # dirty buffer
        got = pack.pack_record(**kw, out=out)
        assert got.data_ptr() == out.data_ptr() and got.numel() == fresh.numel()
        assert torch.equal(got, fresh)  # padding was zeroed
        with pytest.raises(ValueError, match="needs"):
            pack.pack_record(**kw, out=out[:100])


def test_unpack_returns_zero_copy_views():
    ids, mask, aux, last = sample(7, 8, 3)
    buf = pack.pack_record(
        epoch=0, index=0, input_ids=ids, loss_mask=mask, aux_hidden=aux, last_hidden=last
    )
    rec = pack.unpack_record(buf)
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
    for t in (rec.input_ids, rec.loss_mask, rec.aux_hidden, rec.last_hidden):
        assert t is not None and lo <= t.data_ptr() < hi
    from_bytes = pack.unpack_record(bytes(buf.numpy()))
    assert torch.equal(from_bytes.aux_hidden, rec.aux_hidden)


def test_cuda_host_glue_with_a_stand_in_kernel(monkeypatch):
    """The host half of the CUDA path (staging offsets, copy, padding, CRCs, header) runs
    here with a stand-in that writes what the kernel must write; the kernel itself is
    checked against the torch path in tests/gpu/test_pack_cuda.py."""
    import ctypes

    ids, mask, aux, last = sample(13, 40, 3, special=True)
    kw = dict(epoch=2, index=3, input_ids=ids, loss_mask=mask, aux_hidden=aux, last_hidden=last)
    use(monkeypatch, "torch")
    ref = pack.pack_record(**kw)
    plan = pack._plan(ids, mask, aux, last, torch.bfloat16, None)
    (_, _), (_, _), (o2, n2), (o3, n3) = plan.layout.sections

    class StandIn:
        def specctl_cuda_pack_hidden(self, aux_out, last_out, *args):
            ctypes.memmove(aux_out, ref[o2:].data_ptr(), n2)
            ctypes.memmove(last_out, ref[o3:].data_ptr(), n3)
            return 0

    monkeypatch.setattr(pack, "_cuda_lib", lambda: StandIn())
    out = torch.full((ref.numel(),), 0xEE, dtype=torch.uint8)
    crcs = pack._pack_cuda(plan, out)
    assert crcs == [e.crc for e in pack.unpack_record(ref).header.sections]
    assert torch.equal(out[128:], ref[128:])


# ---------------------------------------------------------------------------- rejection


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(data=st.data())
def test_corruption_is_detected_or_harmless(monkeypatch, backend, data):
    use(monkeypatch, backend)
    ids, mask, aux, last = sample(11, 24, 3)
    buf = pack.pack_record(
        epoch=5, index=6, input_ids=ids, loss_mask=mask, aux_hidden=aux, last_hidden=last
    )
    good = pack.unpack_record(buf.clone())
    pos = data.draw(st.integers(0, buf.numel() - 1))
    buf[pos] ^= data.draw(st.integers(1, 255))
    in_section = any(
        o <= pos < o + n for o, n in ((e.offset, e.nbytes) for e in good.header.sections)
    )
    if pos < protocol.HEADER_NBYTES or in_section:
        with pytest.raises(RecordError):
            pack.unpack_record(buf)
    else:  # padding is not covered by a CRC: the data read back is unchanged
        rec = pack.unpack_record(buf)
        assert torch.equal(rec.aux_hidden, good.aux_hidden)


def test_section_crc_mismatch_names_the_section_and_verify_false_skips_it():
    ids, mask, aux, last = sample(5, 8, 3)
    buf = pack.pack_record(
        epoch=0, index=0, input_ids=ids, loss_mask=mask, aux_hidden=aux, last_hidden=last
    )
    rec = pack.unpack_record(buf)
    buf[rec.header.section("last_hidden").offset + 3] ^= 0x10
    with pytest.raises(RecordError, match="CRC mismatch in section last_hidden"):
        pack.unpack_record(buf)
    pack.unpack_record(buf, verify=False)  # CRCs skipped ...
    buf[0] ^= 1
    with pytest.raises(RecordError, match="bad magic"):  # ... header checks never
        pack.unpack_record(buf, verify=False)


@FAST
@given(cut=st.integers(0, 639))
def test_truncation_is_rejected(cut):
    ids, mask, aux, last = sample(5, 8, 3)
    buf = pack.pack_record(
        epoch=0, index=0, input_ids=ids, loss_mask=mask, aux_hidden=aux, last_hidden=last
    )
    assert buf.numel() == 640
    with pytest.raises(RecordError, match="truncated"):
        pack.unpack_record(bytes(buf[:cut].numpy()))


def test_bad_inputs_are_value_errors():
    ids, mask, aux, last = sample(5, 8, 3)
    with pytest.raises(ValueError):
        pack.pack_record(
            epoch=0, index=0, input_ids=ids, loss_mask=mask[:4], aux_hidden=aux, last_hidden=last
        )
    with pytest.raises(ValueError):
        pack.pack_record(
            epoch=0,
            index=0,
            input_ids=ids,
            loss_mask=mask,
            aux_hidden=[aux[0][:, :4]],
            last_hidden=last,
        )
    with pytest.raises(ValueError, match="num_aux"):
        pack.pack_record(
            epoch=0,
            index=0,
            input_ids=ids,
            loss_mask=mask,
            aux_hidden=torch.cat(aux, 1),
            last_hidden=None,
        )
    with pytest.raises(ValueError):
        pack.pack_record(
            epoch=0, index=0, input_ids=ids, loss_mask=mask, aux_hidden=None, last_hidden=None
        )


# ---------------------------------------------------------------------------- backend


def test_backend_selection(monkeypatch):
    monkeypatch.setenv("SPECCTL_PACK", "torch")
    assert pack.backend() == "torch"
    monkeypatch.delenv("SPECCTL_PACK")
    assert pack.backend() == ("native" if pack._native_lib() else "torch")


@pytest.mark.skipif(
    shutil.which("c++") is None, reason="no C++ compiler: the build skips the library"
)
def test_native_library_was_built_by_the_install():
    assert pack._native_lib() is not None, "pip install -e . did not build specctl/_pack_native*.so"


@pytest.mark.skipif(pack._native_lib() is None, reason="native pack library not built")
@FAST
@given(blob=st.binary(max_size=5000), split=st.integers(0, 5000), threads=st.integers(1, 4))
def test_native_crc32c_matches_package(blob, split, threads):
    lib = pack._native_lib()
    assert lib is not None
    data = torch.frombuffer(bytearray(blob + b"\0"), dtype=torch.uint8)
    assert lib.specctl_crc32c(0, data.data_ptr(), len(blob)) == crc32c_pkg.crc32c(blob)
    split = min(split, len(blob))
    head = lib.specctl_crc32c(0, data.data_ptr(), split)
    assert lib.specctl_crc32c_combine(
        head, crc32c_pkg.crc32c(blob[split:]), len(blob) - split
    ) == crc32c_pkg.crc32c(blob)
    import ctypes

    offs, sizes, out = (
        (ctypes.c_uint64 * 1)(0),
        (ctypes.c_uint64 * 1)(len(blob)),
        (ctypes.c_uint32 * 1)(),
    )
    assert lib.specctl_crc32c_ranges(data.data_ptr(), offs, sizes, 1, out, threads) == 0
    assert out[0] == crc32c_pkg.crc32c(blob)
