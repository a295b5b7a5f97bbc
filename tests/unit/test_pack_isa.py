"""Each native ISA path (scalar, SSE4.2, AVX2, AVX-512, VPCLMULQDQ) writes the torch bytes.

The library picks its paths once per process, so every ISA level runs in a subprocess
with SPECCTL_PACK_ISA capping it (levels the CPU lacks fall back to lower ones) and a
low SPECCTL_PACK_STREAM_MIN, so both the in-place and the non-temporal-store paths run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from specctl import pack

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(pack._native_lib() is None, reason="native pack library not built"),
]

CHECK = r"""
import os, crc32c, torch
from specctl import pack
g = torch.Generator().manual_seed(0)
bits = torch.tensor([0x7FC00000, 0xFFC00001, 0x7F800000, 0xFF800000, 0x00000001, 0x007FFFFF,
                     0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x80000000], dtype=torch.int64)
special = bits.to(torch.int32).view(torch.float32)
shapes = [(1, 1, 1), (5, 17, 3), (33, 100, 3), (64, 576, 3), (300, 1031, 3)]
for T, H, k in shapes:
    states = [torch.randn(T, H, generator=g) for _ in range(k + 1)]
    for s in states:
        s.view(-1)[: special.numel()] = special[: T * H]
    for in_dtype in (torch.float32, torch.bfloat16):
        kw = dict(epoch=1, index=2, input_ids=torch.arange(T), loss_mask=torch.ones(T),
                  aux_hidden=[s.to(in_dtype) for s in states[:k]], last_hidden=states[k].to(in_dtype))
        os.environ["SPECCTL_PACK"] = "torch"
        ref = pack.pack_record(**kw).clone()
        os.environ["SPECCTL_PACK"] = "native"
        for threads in ("1", "3"):
            os.environ["SPECCTL_PACK_THREADS"] = threads
            got = pack.pack_record(**kw)
            assert torch.equal(ref, got), (T, H, k, in_dtype, threads)
            pack.unpack_record(got)
lib = pack._native_lib()
blob = torch.randint(0, 256, (100_003,), dtype=torch.uint8, generator=g)
for n in (0, 7, 255, 256, 511, 512, 4096, 100_003):
    assert lib.specctl_crc32c(0, blob.data_ptr(), n) == crc32c.crc32c(blob[:n].numpy().data), n
print(lib.specctl_pack_cpu_features())
"""


@pytest.mark.parametrize("isa", ["scalar", "sse4.2", "avx2", "avx512", ""])
def test_isa_path_matches_torch(isa):
    env = {**os.environ, "SPECCTL_PACK_ISA": isa, "PYTHONPATH": os.pathsep.join(sys.path)}
    env["SPECCTL_PACK_STREAM_MIN"] = str(64 << 10)  # shapes from 64 KiB take the streaming path
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
