"""Pack hidden states into wire records and read them back as zero-copy views.

Two packers write the same bytes (docs/wire-protocol.md; a test compares them byte for
byte): the native library built from csrc/pack.cpp (one pass: gather, fp32->bf16, CRC32C,
threads) and the pure-torch path below, which is the readable reference. Device tensors
go through csrc/pack_cuda.cu when it is built, otherwise through the host.
`SPECCTL_PACK=torch` forces the torch path, `SPECCTL_PACK=native` insists on the library;
`SPECCTL_PACK_THREADS=n` caps the native threads (0 = by size).

Traps:
- torch's own fp32->bf16 cast is round-to-nearest-even, but its NaN bits depend on the
  CPU kernel (0xFFFF from the AVX2/AVX-512 kernels, 0x7FC0 from the scalar one). The
  record wants 0x7FC0 for every NaN, so the torch path rewrites NaNs after the cast.
- The native library is a plain shared object loaded with ctypes (no libtorch ABI to
  match); ctypes releases the GIL for the call, so packing overlaps other Python threads.
- Views returned by `unpack_record` alias the buffer: keep the buffer alive and unchanged
  while they are used (the store client hands out a buffer per received record).
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import crc32c as crc32c_pkg
import torch

from specctl import protocol
from specctl.console import log
from specctl.errors import RecordError, UsageError
from specctl.protocol import RecordHeader

DTYPE_CODES = {torch.bfloat16: protocol.DTYPE_BF16, torch.float32: protocol.DTYPE_FP32}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_BF16_NAN = 0x7FC0
_CUDA_MAX_AUX = 8  # kMaxAux in csrc/pack_cuda.cu (kernel arguments are passed by value)

Buffer = torch.Tensor | bytes | bytearray | memoryview


@dataclass(frozen=True)
class Record:
    """A parsed record: tensors are views into the buffer it was read from."""

    header: RecordHeader
    input_ids: torch.Tensor  # [T] int32
    loss_mask: torch.Tensor  # [T] uint8
    aux_hidden: torch.Tensor | None  # [T, k*H]
    last_hidden: torch.Tensor | None  # [T, H]

    @property
    def epoch(self) -> int:
        return self.header.epoch

    @property
    def index(self) -> int:
        return self.header.index


@dataclass
class _Plan:
    """Validated inputs of one pack: every hidden source is a [T, H] view, inner stride 1."""

    T: int
    H: int
    out_code: int
    flags: int
    layout: protocol.Layout
    input_ids: torch.Tensor  # [T] int32, contiguous, CPU
    loss_mask: torch.Tensor  # [T] uint8 bytes (nonzero = 1: packers write 0/1), contiguous, CPU
    aux: list[torch.Tensor]  # k x [T, H]
    last: torch.Tensor | None  # [T, H]


# ---------------------------------------------------------------------------- public API


def record_nbytes(T: int, H: int, num_aux: int, dtype: torch.dtype, has_last: bool = True) -> int:
    """Size in bytes of a record with these shapes (to size a store buffer before packing)."""
    flags = (protocol.FLAG_HAS_AUX if num_aux else 0) | (protocol.FLAG_HAS_LAST if has_last else 0)
    return protocol.layout(T, H, num_aux, DTYPE_CODES[dtype], flags).total_nbytes


def pack_record(
    *,
    epoch: int,
    index: int,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    aux_hidden: torch.Tensor | Sequence[torch.Tensor] | None,
    last_hidden: torch.Tensor | None,
    dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    num_aux: int | None = None,
) -> torch.Tensor:
    """Pack one sample into a record; returns the uint8 [total_nbytes] record tensor.

    aux_hidden: k tensors [T, H] (gathered in the same pass, no torch.cat) or one
    [T, k*H] tensor (then k comes from last_hidden's H, or `num_aux` when there is no
    last_hidden). Hidden states may be fp32 or bf16, strided, on CPU or CUDA; `dtype` is
    the record's. `out`: a CPU uint8 tensor with at least total_nbytes elements to pack
    into (a registered store buffer); the result is then a view of its prefix.
    """
    plan = _plan(input_ids, loss_mask, aux_hidden, last_hidden, dtype, num_aux)
    total = plan.layout.total_nbytes
    if out is None:
        out = torch.empty(total, dtype=torch.uint8)
    if out.dtype != torch.uint8 or out.dim() != 1 or not out.is_contiguous() or out.is_cuda:
        raise ValueError("out must be a contiguous 1-D uint8 CPU tensor")
    if out.numel() < total:
        raise ValueError(f"out holds {out.numel()} bytes, the record needs {total}")
    buf = out[:total]
    on_cuda = any(t.is_cuda for t in [*plan.aux, *([plan.last] if plan.last is not None else [])])
    if on_cuda and len(plan.aux) <= _CUDA_MAX_AUX and _cuda_lib() and backend() == "native":
        crcs = _pack_cuda(plan, buf)
    else:
        if on_cuda:  # no kernel: bring the states to the host, same bytes either way
            plan.aux = [a.cpu() for a in plan.aux]
            plan.last = plan.last.cpu() if plan.last is not None else None
        crcs = _pack_native(plan, buf) if backend() == "native" else _pack_torch(plan, buf)
    header = protocol.encode_header(
        T=plan.T, H=plan.H, num_aux=len(plan.aux), dtype_code=plan.out_code, flags=plan.flags,
        epoch=epoch, index=index, section_crcs=crcs, crc_fn=crc32c_pkg.crc32c,
    )  # fmt: skip
    ctypes.memmove(buf.data_ptr(), header, protocol.HEADER_NBYTES)
    return buf


def unpack_record(buf: Buffer, *, verify: bool = True) -> Record:
    """Check a record (reader checks 1-8) and return views of its sections.

    `verify=False` skips the section CRCs (check 8) but never the header checks.
    Raises RecordError naming what is wrong.
    """
    data = _as_uint8(buf)
    raw = data.numpy().data if data.numel() else b""
    header = protocol.parse_header(raw, crc_fn=crc32c_pkg.crc32c)
    if verify:
        _verify_sections(data, header)
    if data.storage_offset() % 4:  # dtype views need an aligned storage offset
        data = data.clone()
    dtype = CODE_DTYPES[header.dtype_code]

    def view(i: int, dt: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        entry = header.sections[i]
        return data[entry.offset : entry.offset + entry.nbytes].view(dt).view(shape)

    T, H, k = header.T, header.H, header.num_aux
    return Record(
        header=header,
        input_ids=view(0, torch.int32, (T,)),
        loss_mask=view(1, torch.uint8, (T,)),
        aux_hidden=view(2, dtype, (T, k * H)) if header.has_aux else None,
        last_hidden=view(3, dtype, (T, H)) if header.has_last else None,
    )


def backend() -> str:
    """Which packer runs: `native` when the csrc library is built and not disabled, else `torch`."""
    mode = os.environ.get("SPECCTL_PACK", "auto").lower()
    if mode == "torch":
        return "torch"
    if _native_lib() is not None:
        return "native"
    if mode == "native":
        raise UsageError(
            "SPECCTL_PACK=native but the native pack library is not built",
            hint="reinstall with a C++ compiler: pip install -e .",
        )
    return "torch"


# ---------------------------------------------------------------------------- inputs


def _plan(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    aux_hidden: torch.Tensor | Sequence[torch.Tensor] | None,
    last_hidden: torch.Tensor | None,
    dtype: torch.dtype,
    num_aux: int | None,
) -> _Plan:
    """Check shapes and dtypes; split aux_hidden into k [T, H] views (no copies)."""
    if dtype not in DTYPE_CODES:
        raise ValueError(f"record dtype must be bfloat16 or float32, got {dtype}")
    # This runs per record: no torch op unless the inputs need one (each costs microseconds)
    ids = input_ids.reshape(-1)
    if ids.dtype != torch.int32 or ids.device.type != "cpu":
        ids = ids.to(device="cpu", dtype=torch.int32)
    ids = ids.contiguous()
    T = ids.numel()
    mask = loss_mask.reshape(-1)
    if mask.device.type != "cpu":
        mask = mask.cpu()
    if mask.dtype != torch.uint8:  # bytes as they are: the packers write nonzero as 1
        mask = (mask if mask.dtype == torch.bool else mask != 0).view(torch.uint8)
    mask = mask.contiguous()
    if T < 1 or mask.numel() != T:
        raise ValueError(f"input_ids has {T} tokens, loss_mask {mask.numel()}; need equal, >= 1")
    last = _source(last_hidden) if last_hidden is not None else None
    if aux_hidden is None:
        aux = []
    elif isinstance(aux_hidden, torch.Tensor):
        k = num_aux or (aux_hidden.shape[-1] // last.shape[-1] if last is not None else 0)
        if k < 1 or aux_hidden.dim() != 2 or aux_hidden.shape[-1] % k:
            raise ValueError("aux_hidden [T, k*H] needs last_hidden or num_aux to give k")
        whole, h = _source(aux_hidden), aux_hidden.shape[-1] // k
        aux = [whole[:, j * h : (j + 1) * h] for j in range(k)]  # [T, H] views
    else:
        aux = [_source(a) for a in aux_hidden]
    sources = [*aux, *([last] if last is not None else [])]
    if not sources:
        raise ValueError("a record needs aux_hidden or last_hidden")
    H = sources[0].shape[-1]
    for s in sources:
        if s.dim() != 2 or tuple(s.shape) != (T, H) or s.device != sources[0].device:
            raise ValueError(f"hidden states must all be [T={T}, H={H}] on one device")
    if len(aux) > 255 or H < 1:
        raise ValueError(f"impossible shapes: k={len(aux)}, H={H}")
    if len({s.dtype for s in sources}) > 1:  # one input dtype per pack: widen bf16 (exact)
        aux = [a.float() for a in aux]
        last = last.float() if last is not None else None
    flags = (protocol.FLAG_HAS_AUX if aux else 0) | (
        protocol.FLAG_HAS_LAST if last is not None else 0
    )
    out_code = DTYPE_CODES[dtype]
    lay = protocol.layout(T, H, len(aux), out_code, flags)
    return _Plan(T, H, out_code, flags, lay, ids, mask, aux, last)


def _source(t: torch.Tensor) -> torch.Tensor:
    """A hidden-state source the packers read row by row: fp32/bf16, unit inner stride."""
    if t.dtype not in DTYPE_CODES:
        t = t.float()  # fp16 and friends widen exactly; then one rounding to the record dtype
    if t.dim() == 2 and t.stride(-1) != 1:
        t = t.contiguous()
    return t


def _as_uint8(buf: Buffer) -> torch.Tensor:
    """The buffer as a flat CPU uint8 tensor, without copying."""
    if isinstance(buf, torch.Tensor):
        if buf.dtype != torch.uint8 or buf.is_cuda:
            raise RecordError("record buffer must be a CPU uint8 tensor or bytes")
        return buf.reshape(-1)
    view = memoryview(buf).cast("B")
    if len(view) == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():  # read-only bytes: the views are read-only too
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=torch.uint8)


# ---------------------------------------------------------------------------- torch path


def _pack_torch(plan: _Plan, buf: torch.Tensor) -> list[int]:
    """The reference packer: section by section with torch ops; returns section CRCs."""
    T, H, k = plan.T, plan.H, len(plan.aux)
    dtype = CODE_DTYPES[plan.out_code]
    sections = plan.layout.sections
    # 1. zero the padding: between sections and after the last one
    end = protocol.HEADER_NBYTES
    for offset, nbytes in sections:
        if nbytes:
            buf[end:offset].zero_()
            end = offset + nbytes
    buf[end:].zero_()

    def section(i: int, dt: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        offset, nbytes = sections[i]
        return buf[offset : offset + nbytes].view(dt).view(shape)

    # 2. tokens and mask
    section(0, torch.int32, (T,)).copy_(plan.input_ids)
    section(1, torch.uint8, (T,)).copy_(plan.loss_mask != 0)
    # 3. aux layers side by side: row t = [aux_0[t], ..., aux_{k-1}[t]]
    if k:
        aux = section(2, dtype, (T, k, H))
        for j, src in enumerate(plan.aux):
            _cast_into(aux[:, j], src)
    # 4. last hidden state
    if plan.last is not None:
        _cast_into(section(3, dtype, (T, H)), plan.last)
    # 5. CRC32C of each section's bytes (absent sections: 0)
    return [crc32c_pkg.crc32c(buf[o : o + n].numpy().data) if n else 0 for o, n in sections]


def _cast_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- src with the record's rounding: RNE to bf16, every NaN as 0x7FC0."""
    dst.copy_(src)
    if dst.dtype == torch.bfloat16 and src.dtype == torch.float32:
        nan = src.isnan()
        if nan.any():
            dst.view(torch.int16)[nan] = _BF16_NAN


# ---------------------------------------------------------------------------- native path

_c = ctypes
_u64p, _u32p = _c.POINTER(_c.c_uint64), _c.POINTER(_c.c_uint32)


@functools.cache
def _native_lib() -> ctypes.CDLL | None:
    lib = _load("_pack_native", "specctl_pack_abi_version", 2)
    if lib is None:
        return None
    lib.specctl_pack_sections.restype = _c.c_int
    lib.specctl_pack_sections.argtypes = [
        _c.c_void_p, _c.c_uint64, _u64p, _c.c_uint32, _c.c_uint32, _c.c_uint32, _c.c_int,
        _c.c_void_p, _c.c_void_p, _c.POINTER(_c.c_void_p), _c.POINTER(_c.c_int64), _c.c_int,
        _c.c_void_p, _c.c_int64, _c.c_int, _u32p, _c.c_int,
    ]  # fmt: skip
    lib.specctl_crc32c_ranges.restype = _c.c_int
    lib.specctl_crc32c_ranges.argtypes = [_c.c_void_p, _u64p, _u64p, _c.c_uint32, _u32p, _c.c_int]
    lib.specctl_crc32c.restype = _c.c_uint32
    lib.specctl_crc32c.argtypes = [_c.c_uint32, _c.c_void_p, _c.c_uint64]
    lib.specctl_crc32c_combine.restype = _c.c_uint32
    lib.specctl_crc32c_combine.argtypes = [_c.c_uint32, _c.c_uint32, _c.c_uint64]
    return lib


@functools.cache
def _cuda_lib() -> ctypes.CDLL | None:
    if not torch.cuda.is_available():
        return None
    lib = _load("_pack_cuda", "specctl_cuda_abi_version", 1)
    if lib is not None:
        lib.specctl_cuda_pack_hidden.restype = _c.c_int
        lib.specctl_cuda_pack_hidden.argtypes = [
            _c.c_void_p, _c.c_void_p, _c.c_uint32, _c.c_uint32, _c.c_uint32, _c.c_int,
            _c.POINTER(_c.c_void_p), _c.POINTER(_c.c_int64), _c.c_void_p, _c.c_int64, _c.c_int,
            _c.c_void_p,
        ]  # fmt: skip
    return lib


def _load(stem: str, version_fn: str, version: int) -> ctypes.CDLL | None:
    """Load specctl/<stem>*.so built by setup.py; log once and return None if absent or
    built from other sources (an ABI `version` mismatch: rebuild, csrc/README.md)."""
    found = sorted(Path(__file__).parent.glob(f"{stem}*.so"))
    try:
        lib = ctypes.CDLL(str(found[0]))
        if getattr(lib, version_fn)() != version:
            raise OSError("ABI version mismatch")
        return lib
    except (IndexError, OSError, AttributeError) as e:
        reason = "not built" if not found else str(e)
        log(f"specctl.pack: {stem} unavailable ({reason}); using the pure-torch path")
        return None


def _threads() -> int:
    return int(os.environ.get("SPECCTL_PACK_THREADS", "0"))


def _first_source(plan: _Plan) -> torch.Tensor:
    first = plan.aux[0] if plan.aux else plan.last
    assert first is not None  # _plan guarantees one source
    return first


def _sources_args(plan: _Plan) -> tuple:
    k = len(plan.aux)
    ptrs = (_c.c_void_p * max(k, 1))(*[a.data_ptr() for a in plan.aux])
    strides = (_c.c_int64 * max(k, 1))(*[a.stride(0) for a in plan.aux])
    in_code = DTYPE_CODES[_first_source(plan).dtype]
    last = plan.last
    return (
        ptrs,
        strides,
        in_code,
        (last.data_ptr() if last is not None else None),
        (last.stride(0) if last is not None else 0),
    )


def _pack_native(plan: _Plan, buf: torch.Tensor) -> list[int]:
    lib = _native_lib()
    assert lib is not None
    offsets = (_c.c_uint64 * 4)(*[o for o, _ in plan.layout.sections])
    crcs = (_c.c_uint32 * 4)()
    ptrs, strides, in_code, last_ptr, last_stride = _sources_args(plan)
    rc = lib.specctl_pack_sections(
        buf.data_ptr(), buf.numel(), offsets, plan.T, plan.H, len(plan.aux), plan.out_code,
        plan.input_ids.data_ptr(), plan.loss_mask.data_ptr(), ptrs, strides, in_code,
        last_ptr, last_stride, in_code, crcs, _threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"specctl_pack_sections failed with code {rc}")
    return list(crcs)


def _pack_cuda(plan: _Plan, buf: torch.Tensor) -> list[int]:
    """Device states: one kernel gathers/casts sections 2-3 into a device staging buffer,
    one copy brings them to `buf`; ids, mask, padding and CRCs are then done on the host."""
    lib = _cuda_lib()
    assert lib is not None
    (o0, n0), (o1, n1), (o2, n2), (o3, n3) = plan.layout.sections
    first = o2 if n2 else o3
    end = (o3 + n3) if n3 else (o2 + n2)
    device = _first_source(plan).device
    staging = torch.empty(end - first, dtype=torch.uint8, device=device)
    ptrs, strides, in_code, last_ptr, last_stride = _sources_args(plan)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    rc = lib.specctl_cuda_pack_hidden(
        staging.data_ptr() + (o2 - first) if n2 else None,
        staging.data_ptr() + (o3 - first) if n3 else None,
        plan.T, plan.H, len(plan.aux), plan.out_code, ptrs, strides, last_ptr, last_stride,
        in_code, stream,
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"specctl_cuda_pack_hidden failed with CUDA error {rc}")
    buf[first:end].copy_(staging)  # waits for the kernel (same stream)
    buf[o0 : o0 + n0].copy_(plan.input_ids.view(torch.uint8))
    buf[o1 : o1 + n1].copy_(plan.loss_mask != 0)
    ends = [(o, o + n) for o, n in plan.layout.sections if n]
    for (_, gap_start), (gap_end, _) in zip(ends, [*ends[1:], (buf.numel(), 0)], strict=True):
        buf[gap_start:gap_end].zero_()
    return _section_crcs(buf, plan.layout.sections)


# ---------------------------------------------------------------------------- verify


def _section_crcs(data: torch.Tensor, sections: Sequence[tuple[int, int]]) -> list[int]:
    """CRC32C of each (offset, nbytes) range of `data` (0 for an empty one)."""
    lib = _native_lib() if backend() == "native" else None
    if lib is None:
        view = data.numpy()
        return [crc32c_pkg.crc32c(view[o : o + n].data) if n else 0 for o, n in sections]
    n = len(sections)
    offsets = (_c.c_uint64 * n)(*[o for o, _ in sections])
    sizes = (_c.c_uint64 * n)(*[s for _, s in sections])
    crcs = (_c.c_uint32 * n)()
    if lib.specctl_crc32c_ranges(data.data_ptr(), offsets, sizes, n, crcs, _threads()) != 0:
        raise RuntimeError("specctl_crc32c_ranges failed")
    return list(crcs)


def _verify_sections(data: torch.Tensor, header: RecordHeader) -> None:
    """Reader check 8: each present section's CRC32C against the header."""
    present = [(e.offset, e.nbytes) for e in header.sections]
    for name, entry, crc in zip(
        protocol.SECTION_NAMES, header.sections, _section_crcs(data, present), strict=True
    ):
        if entry.nbytes and crc != entry.crc:
            raise RecordError(
                f"CRC mismatch in section {name}: stored {entry.crc:#010x}, computed {crc:#010x}"
            )
