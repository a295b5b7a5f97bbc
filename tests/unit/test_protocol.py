"""Wire protocol: layout, header checks 1-7 with their exact errors, CRC32C, descriptors."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys

import crc32c as crc32c_pkg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specctl import protocol as p
from specctl.errors import RecordError

pytestmark = pytest.mark.unit
FAST = settings(max_examples=60, deadline=None)


def header(
    T=5, H=8, num_aux=3, dtype_code=p.DTYPE_BF16, flags=3, epoch=1, index=2, crcs=(1, 2, 3, 4)
):
    return p.encode_header(
        T=T, H=H, num_aux=num_aux, dtype_code=dtype_code, flags=flags, epoch=epoch, index=index,
        section_crcs=crcs,
    )  # fmt: skip


def record(**kw) -> bytearray:
    """A header followed by enough (zero) bytes for its whole record."""
    h = header(**kw)
    return bytearray(h) + bytearray(p.parse_header(h + bytes(1 << 16)).total_nbytes - 128)


def reseal(buf: bytearray) -> bytearray:
    """Recompute header_crc after editing fields, so the later checks are reached."""
    struct.pack_into("<I", buf, 124, p.crc32c(bytes(buf[:124])))
    return buf


def test_crc32c_check_value_and_continuation():
    assert p.crc32c(b"123456789") == 0xE3069283
    assert p.crc32c(b"") == 0
    assert p.crc32c(b"56789", p.crc32c(b"1234")) == 0xE3069283


@FAST
@given(st.binary(max_size=300))
def test_crc32c_matches_package(data):
    assert p.crc32c(data) == crc32c_pkg.crc32c(data)


def test_layout_matches_the_spec_example():
    # T=5, H=8, k=3, bf16: ids 20 B @128, mask 5 B @192, aux 240 B @256, last 80 B @512
    lay = p.layout(5, 8, 3, p.DTYPE_BF16, p.FLAG_HAS_AUX | p.FLAG_HAS_LAST)
    assert lay.sections == ((128, 20), (192, 5), (256, 240), (512, 80))
    assert lay.total_nbytes == 640
    only_last = p.layout(5, 8, 0, p.DTYPE_FP32, p.FLAG_HAS_LAST)
    assert only_last.sections == ((128, 20), (192, 5), (0, 0), (256, 160))


@FAST
@given(
    T=st.integers(1, 5000),
    H=st.integers(1, 9000),
    k=st.integers(0, 5),
    dtype_code=st.sampled_from([p.DTYPE_BF16, p.DTYPE_FP32]),
    has_last=st.booleans(),
    epoch=st.integers(0, 2**32 - 1),
    index=st.integers(0, 2**32 - 1),
)
def test_header_round_trip(T, H, k, dtype_code, has_last, epoch, index):
    flags = (p.FLAG_HAS_AUX if k else 0) | (p.FLAG_HAS_LAST if has_last else 0)
    crcs = (11, 22, 33 if k else 0, 44 if has_last else 0)
    h = p.encode_header(
        T=T, H=H, num_aux=k, dtype_code=dtype_code, flags=flags, epoch=epoch, index=index,
        section_crcs=crcs,
    )  # fmt: skip
    assert len(h) == p.HEADER_NBYTES
    lay = p.layout(T, H, k, dtype_code, flags)
    got = p.parse_header(h + bytes(lay.total_nbytes - 128))
    assert (got.T, got.H, got.num_aux, got.dtype_code, got.flags) == (T, H, k, dtype_code, flags)
    assert (got.epoch, got.index, got.total_nbytes) == (epoch, index, lay.total_nbytes)
    assert [(e.offset, e.nbytes, e.crc) for e in got.sections] == [
        (o, n, c) for (o, n), c in zip(lay.sections, crcs, strict=True)
    ]
    assert lay.total_nbytes % 64 == 0
    assert all(o % 64 == 0 for o, _ in lay.sections)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda b: b[:100], "truncated header"),
        (lambda b: b"XPCTLREC" + b[8:], "bad magic"),
        (lambda b: reseal(bytearray(b[:8]) + struct.pack("<H", 2) + b[10:]), "unsupported version"),
        (
            lambda b: reseal(bytearray(b[:10]) + struct.pack("<H", 64) + b[12:]),
            "unsupported version",
        ),
        (lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], "header CRC mismatch"),
        (lambda b: reseal(b[:12] + b"\x07" + b[13:]), "impossible header"),  # dtype 7
        (lambda b: reseal(b[:14] + b"\x07\x00" + b[16:]), "impossible header"),  # unknown flag
        (lambda b: reseal(b[:13] + b"\x00" + b[14:]), "impossible header"),  # HAS_AUX, k=0
        (lambda b: reseal(b[:16] + bytes(4) + b[20:]), "impossible header"),  # T=0
        (lambda b: reseal(b[:120] + b"\x01" + b[121:]), "impossible header"),  # reserved
        (lambda b: reseal(b[:20] + struct.pack("<I", 9) + b[24:]), "impossible sizes"),  # H
        (lambda b: reseal(b[:24] + struct.pack("<Q", 704) + b[32:]), "impossible sizes"),  # total
        (lambda b: reseal(b[:40] + struct.pack("<Q", 192) + b[48:]), "impossible sizes"),  # offset
        (lambda b: b[:600], "truncated record"),
    ],
)
def test_each_reader_check_raises_its_error(edit, message):
    buf = record()
    p.parse_header(buf)  # the unedited record is fine
    with pytest.raises(RecordError, match=message):
        p.parse_header(bytes(edit(bytearray(buf))))


@FAST
@given(data=st.data())
def test_any_header_byte_flip_is_rejected(data):
    buf = record()
    pos = data.draw(st.integers(0, 127))
    flip = data.draw(st.integers(1, 255))
    buf[pos] ^= flip
    with pytest.raises(RecordError):
        p.parse_header(buf)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=700))
def test_garbage_only_raises_record_error(blob):
    with pytest.raises(RecordError):
        p.parse_header(blob)


@FAST
@given(st.binary(min_size=124, max_size=124))
def test_garbage_with_valid_magic_and_crc_only_raises_record_error(body):
    buf = bytearray(p.MAGIC) + struct.pack("<HH", 1, 128) + bytearray(body[12:]) + bytes(4)
    with contextlib.suppress(RecordError):
        p.parse_header(reseal(buf) + bytes(1 << 12))


def test_encode_header_refuses_impossible_fields():
    with pytest.raises(RecordError, match="impossible header"):
        header(num_aux=0, flags=3)
    with pytest.raises(RecordError, match="impossible header"):
        header(epoch=2**32)


# ---------------------------------------------------------------------------- descriptor


def descriptor(**kw) -> p.Descriptor:
    fields = dict(v=1, key="run/3/7/host:123:0/5", run="run", epoch=3, index=7, nbytes=640, T=5,
                  crc=99, producer="host:123", put="host:123:0/5")  # fmt: skip
    fields.update(kw)
    return p.Descriptor(**fields)


def test_descriptor_round_trip_and_header_match():
    h = p.parse_header(record(epoch=3, index=7))
    d = p.Descriptor.for_header(h, run="run", producer="host:123", put="host:123:0/5")
    text = d.to_json()
    assert len(text.encode()) < 1024
    assert p.Descriptor.from_json(text) == d
    assert p.Descriptor.from_json(text.encode()) == d
    d.check_matches(h)


@pytest.mark.parametrize("field", ["epoch", "index", "nbytes", "T", "crc"])
def test_descriptor_disagreeing_with_header_is_rejected(field):
    h = p.parse_header(record(epoch=3, index=7))
    d = p.Descriptor.for_header(h, run="run", producer="host:123", put="host:123:0/5")
    fields = json.loads(d.to_json())
    fields[field] += 1
    fields["key"] = p.record_key("run", fields["epoch"], fields["index"], fields["put"])
    with pytest.raises(RecordError, match=f"{field} "):
        p.Descriptor(**fields).check_matches(h)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda o: o.update(extra=1),
        lambda o: o.pop("crc"),
        lambda o: o.update(T=[5]),
        lambda o: o.update(T={"a": 1}),
        lambda o: o.update(T=5.0),
        lambda o: o.update(T=True),
        lambda o: o.update(run=None),
        lambda o: o.update(T=-1),
        lambda o: o.update(v=2),
        lambda o: o.update(key="other/3/7/host:123:0/5"),
        lambda o: o.update(key="run/3/7"),  # no put: the key of another put
        lambda o: o.update(producer="x" * 1100),
    ],
)
def test_descriptor_rejections(mutate):
    obj = json.loads(descriptor().to_json())
    mutate(obj)
    with pytest.raises(RecordError, match="bad descriptor"):
        p.Descriptor.from_json(json.dumps(obj))


@pytest.mark.parametrize("text", ["", "[]", "{", "null", '"s"', b"\xff\xfe", "[" * 5000])
def test_descriptor_not_an_object(text):
    with pytest.raises(RecordError, match="bad descriptor"):
        p.Descriptor.from_json(text)


def test_descriptor_to_json_refuses_oversize():
    with pytest.raises(RecordError, match="bad descriptor"):
        descriptor(run="r" * 600, key="r" * 600 + "/3/7/host:123:0/5").to_json()


def test_protocol_imports_stdlib_only():
    code = (
        "import specctl.protocol, sys; "
        "assert not any(m in sys.modules for m in ('torch', 'numpy')), sorted(sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
