"""The wire contract: record header, section layout and control-plane descriptor.

Both sides of the wire (producer and trainer) import this module and nothing else
defines these constants; `docs/wire-protocol.md` describes the same bytes. It is
stdlib-only on purpose (a test checks that importing it pulls in no torch/numpy), so
that a control-plane process or a debugging script can read records without tensors.

Nothing here is unpickled: the header is a fixed little-endian `struct`, the descriptor
is JSON restricted to string and integer values.

`crc32c` below is a pure-Python table implementation: the reference for tests and the
128-byte header. Bulk section CRCs use the native extension or the `crc32c` package
(see `specctl.pack`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass

from specctl.errors import RecordError

MAGIC = b"SPCTLREC"
VERSION = 1
HEADER_NBYTES = 128
ALIGN = 64

DTYPE_BF16 = 1
DTYPE_FP32 = 2
DTYPE_ITEMSIZE = {DTYPE_BF16: 2, DTYPE_FP32: 4}

FLAG_HAS_AUX = 1 << 0
FLAG_HAS_LAST = 1 << 1
KNOWN_FLAGS = FLAG_HAS_AUX | FLAG_HAS_LAST

SECTION_NAMES = ("input_ids", "loss_mask", "aux_hidden", "last_hidden")
NUM_SECTIONS = len(SECTION_NAMES)

# magic, version, header_nbytes, dtype, num_aux, flags, T, H, total_nbytes, epoch, index
_FIXED = struct.Struct("<8sHHBBHIIQII")
_SECTION = struct.Struct("<QQI")  # offset, nbytes, crc32c
_TAIL = struct.Struct("<II")  # reserved, header_crc
HEADER_CRC_OFFSET = HEADER_NBYTES - 4
assert _FIXED.size + NUM_SECTIONS * _SECTION.size + _TAIL.size == HEADER_NBYTES

_U32_MAX = 0xFFFFFFFF


# ---------------------------------------------------------------------------- CRC32C


def _make_crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _make_crc_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of `data`, continuing from a previous `crc` (0 to start).

    Slow (about 10 MB/s): meant for headers, tests and small buffers.
    `crc32c(b"123456789") == 0xE3069283`.
    """
    table = _CRC_TABLE
    crc ^= 0xFFFFFFFF
    for byte in memoryview(data).cast("B"):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------------------- layout


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class Layout:
    """Where each section lives: `sections[i] = (offset, nbytes)`, (0, 0) when absent."""

    sections: tuple[tuple[int, int], ...]
    total_nbytes: int


@functools.lru_cache(maxsize=1024)  # per record on both sides; a run has few distinct shapes
def layout(T: int, H: int, num_aux: int, dtype_code: int, flags: int) -> Layout:
    """Section offsets and sizes derived from the header fields (docs/wire-protocol.md)."""
    item = DTYPE_ITEMSIZE[dtype_code]
    sizes = (
        4 * T,  # input_ids int32 [T]
        T,  # loss_mask uint8 [T]
        T * num_aux * H * item if flags & FLAG_HAS_AUX else 0,  # aux_hidden [T, k*H]
        T * H * item if flags & FLAG_HAS_LAST else 0,  # last_hidden [T, H]
    )
    present = (True, True, bool(flags & FLAG_HAS_AUX), bool(flags & FLAG_HAS_LAST))
    sections = []
    end = HEADER_NBYTES
    for nbytes, here in zip(sizes, present, strict=True):
        if not here:
            sections.append((0, 0))
            continue
        offset = align_up(end)
        sections.append((offset, nbytes))
        end = offset + nbytes
    return Layout(tuple(sections), align_up(end))


# ---------------------------------------------------------------------------- header


@dataclass(frozen=True)
class SectionEntry:
    offset: int
    nbytes: int
    crc: int


@dataclass(frozen=True)
class RecordHeader:
    """The decoded 128-byte header. `sections` is in SECTION_NAMES order."""

    dtype_code: int
    num_aux: int
    flags: int
    T: int
    H: int
    total_nbytes: int
    epoch: int
    index: int
    sections: tuple[SectionEntry, ...]
    header_crc: int
    version: int = VERSION

    @property
    def has_aux(self) -> bool:
        return bool(self.flags & FLAG_HAS_AUX)

    @property
    def has_last(self) -> bool:
        return bool(self.flags & FLAG_HAS_LAST)

    def section(self, name: str) -> SectionEntry:
        return self.sections[SECTION_NAMES.index(name)]


def encode_header(
    *,
    T: int,
    H: int,
    num_aux: int,
    dtype_code: int,
    flags: int,
    epoch: int,
    index: int,
    section_crcs: tuple[int, int, int, int] | list[int],
    crc_fn: Callable[[bytes], int] | None = None,
) -> bytes:
    """The 128 header bytes for a record whose sections have the given CRCs.

    Offsets and sizes come from `layout`, so a writer cannot encode an inconsistent
    header; the result passes `parse_header`. `crc_fn`: a faster CRC32C (same result).
    """
    _check_fields(dtype_code, flags, T, H, num_aux)
    if not (0 <= epoch <= _U32_MAX and 0 <= index <= _U32_MAX):
        raise RecordError(f"impossible header: sample id ({epoch}, {index}) does not fit u32")
    if T > _U32_MAX or H > _U32_MAX or num_aux > 255:
        raise RecordError(f"impossible header: T={T}, H={H}, num_aux={num_aux} too large")
    lay = layout(T, H, num_aux, dtype_code, flags)
    fixed = _FIXED.pack(
        MAGIC, VERSION, HEADER_NBYTES, dtype_code, num_aux, flags, T, H, lay.total_nbytes,
        epoch, index,
    )  # fmt: skip
    table = b"".join(
        _SECTION.pack(off, n, crc if n or off else 0)
        for (off, n), crc in zip(lay.sections, section_crcs, strict=True)
    )
    body = fixed + table + struct.pack("<I", 0)
    return body + struct.pack("<I", (crc_fn or crc32c)(body))


def parse_header(
    buf: bytes | bytearray | memoryview, crc_fn: Callable[[bytes], int] | None = None
) -> RecordHeader:
    """Decode and check a record header: reader checks 1-7 of docs/wire-protocol.md.

    Check 8 (section CRCs) needs the section bytes and lives in `specctl.pack`.
    `crc_fn`: a faster CRC32C than the pure-Python one (same result).
    Raises RecordError with the specific reason; never another exception type.
    """
    view = memoryview(buf).cast("B")
    # 1. enough bytes for a header
    if len(view) < HEADER_NBYTES:
        raise RecordError(f"truncated header: {len(view)} bytes < {HEADER_NBYTES}")
    head = bytes(view[:HEADER_NBYTES])
    magic, version, hdr_nbytes, dtype_code, num_aux, flags, T, H, total, epoch, index = (
        _FIXED.unpack_from(head, 0)
    )
    # 2. magic
    if magic != MAGIC:
        raise RecordError(f"bad magic: {magic!r} (expected {MAGIC!r}); not a specctl record")
    # 3. version
    if version != VERSION or hdr_nbytes != HEADER_NBYTES:
        raise RecordError(
            f"unsupported version: protocol {version}, header {hdr_nbytes} bytes "
            f"(this reader speaks {VERSION}, {HEADER_NBYTES} bytes)"
        )
    # 4. header CRC
    reserved, header_crc = _TAIL.unpack_from(head, HEADER_CRC_OFFSET - 4)
    if (crc_fn or crc32c)(head[:HEADER_CRC_OFFSET]) != header_crc:
        raise RecordError("header CRC mismatch: the record header is corrupted")
    # 5. field values
    _check_fields(dtype_code, flags, T, H, num_aux)
    entries = tuple(
        SectionEntry(*_SECTION.unpack_from(head, _FIXED.size + i * _SECTION.size))
        for i in range(NUM_SECTIONS)
    )
    if reserved != 0 or any(e.offset == 0 and e.nbytes == 0 and e.crc for e in entries):
        raise RecordError("impossible header: reserved field or absent section entry not zero")
    # 6. sizes derived from the fields
    lay = layout(T, H, num_aux, dtype_code, flags)
    for name, entry, (off, n) in zip(SECTION_NAMES, entries, lay.sections, strict=True):
        if (entry.offset, entry.nbytes) != (off, n):
            raise RecordError(
                f"impossible sizes: section {name} at {entry.offset}+{entry.nbytes}, "
                f"layout says {off}+{n}"
            )
    if total != lay.total_nbytes:
        raise RecordError(f"impossible sizes: total_nbytes {total}, layout says {lay.total_nbytes}")
    # 7. the whole record is there
    if len(view) < total:
        raise RecordError(f"truncated record: {len(view)} bytes < total_nbytes {total}")
    return RecordHeader(dtype_code, num_aux, flags, T, H, total, epoch, index, entries, header_crc)


def _check_fields(dtype_code: int, flags: int, T: int, H: int, num_aux: int) -> None:
    if dtype_code not in DTYPE_ITEMSIZE:
        raise RecordError(f"impossible header: unknown dtype code {dtype_code}")
    if flags & ~KNOWN_FLAGS:
        raise RecordError(f"impossible header: unknown flag bits {flags & ~KNOWN_FLAGS:#x}")
    if T < 1 or H < 1:
        raise RecordError(f"impossible header: T={T}, H={H} (both must be >= 1)")
    if (num_aux >= 1) != bool(flags & FLAG_HAS_AUX):
        raise RecordError(
            f"impossible header: num_aux={num_aux} disagrees with HAS_AUX={bool(flags & FLAG_HAS_AUX)}"
        )


# ---------------------------------------------------------------------------- descriptor

DESCRIPTOR_MAX_NBYTES = 1024


def record_key(run: str, epoch: int, index: int, put: str) -> str:
    """The Mooncake object key of one put of a sample: `{run}/{epoch}/{index}/{put}`.

    One object per put, never shared: a sample put twice (a producer presumed dead that
    published after all) has two objects, so dropping the repeat frees only its own, never
    the one a trainer is reading in place."""
    return f"{run}/{epoch}/{index}/{put}"


@dataclass(frozen=True)
class Descriptor:
    """What the control plane carries per record: names the object, never holds tensors."""

    v: int
    key: str
    run: str
    epoch: int
    index: int
    nbytes: int
    T: int
    crc: int
    producer: str
    put: str  # the put's publication token: two descriptors of one put share it

    @classmethod
    def for_header(cls, header: RecordHeader, *, run: str, producer: str, put: str) -> Descriptor:
        """The descriptor of a packed record (ties key, sizes and header CRC together)."""
        return cls(
            v=VERSION,
            key=record_key(run, header.epoch, header.index, put),
            run=run,
            epoch=header.epoch,
            index=header.index,
            nbytes=header.total_nbytes,
            T=header.T,
            crc=header.header_crc,
            producer=producer,
            put=put,
        )

    def to_json(self) -> str:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # flat: no
        _check_descriptor(fields)  # deep copy (asdict's cost 0.2 ms a record on this host)
        text = json.dumps(fields, separators=(",", ":"), ensure_ascii=False)
        if len(text.encode()) > DESCRIPTOR_MAX_NBYTES:
            raise RecordError(f"bad descriptor: over {DESCRIPTOR_MAX_NBYTES} bytes")
        return text

    @classmethod
    def from_json(cls, data: str | bytes | bytearray) -> Descriptor:
        """Parse and check a descriptor; anything unexpected raises RecordError."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        if len(raw) > DESCRIPTOR_MAX_NBYTES:
            raise RecordError(f"bad descriptor: {len(raw)} bytes > {DESCRIPTOR_MAX_NBYTES}")
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise RecordError(f"bad descriptor: not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise RecordError("bad descriptor: not a JSON object")
        _check_descriptor(obj)
        return cls(**obj)

    def check_matches(self, header: RecordHeader) -> None:
        """Raise RecordError if the record's header disagrees with this descriptor."""
        pairs = {
            "epoch": (self.epoch, header.epoch),
            "index": (self.index, header.index),
            "nbytes": (self.nbytes, header.total_nbytes),
            "T": (self.T, header.T),
            "crc": (self.crc, header.header_crc),
        }
        bad = [f"{k} {d} != {h}" for k, (d, h) in pairs.items() if d != h]
        if bad:
            raise RecordError(f"record {self.key} disagrees with its descriptor: {', '.join(bad)}")


_DESCRIPTOR_TYPES: dict[str, type] = {
    f.name: (str if f.type in ("str", str) else int) for f in dataclasses.fields(Descriptor)
}


def _check_descriptor(obj: dict) -> None:
    keys = set(obj)
    if keys != set(_DESCRIPTOR_TYPES):
        unknown = sorted(map(str, keys - set(_DESCRIPTOR_TYPES)))
        missing = sorted(set(_DESCRIPTOR_TYPES) - keys)
        raise RecordError(f"bad descriptor: unknown keys {unknown}, missing keys {missing}")
    for name, typ in _DESCRIPTOR_TYPES.items():
        value = obj[name]
        # bool is an int subclass in Python: reject it explicitly.
        if type(value) is not typ:
            raise RecordError(f"bad descriptor: {name} must be {typ.__name__}, got {value!r:.40}")
        if isinstance(value, int) and value < 0:
            raise RecordError(f"bad descriptor: {name} must be >= 0, got {value}")
    if obj["v"] != VERSION:
        raise RecordError(f"bad descriptor: unsupported version {obj['v']}")
    if obj["key"] != record_key(obj["run"], obj["epoch"], obj["index"], obj["put"]):
        raise RecordError(f"bad descriptor: key {obj['key']!r:.80} is not run/epoch/index/put")
