"""Builds the pack extension (csrc/) with the system compiler; no libtorch link (see csrc/README.md).

Two plain shared libraries, loaded by `specctl.pack` with ctypes (so they are not Python
extension modules, they only borrow setuptools' build_ext for compiler discovery and
for putting the file where an editable or a wheel install finds it):

- `specctl/_pack_native*.so` from csrc/pack.cpp: the C++ compiler, baseline x86-64
  (SSE4.2/AVX2/AVX-512 paths are chosen at run time inside the library).
- `specctl/_pack_cuda*.so` from csrc/pack_cuda.cu: built with `nvcc` only where it exists.

Neither may fail the install: without a compiler (or nvcc) the build logs one warning
and `specctl.pack` falls back to its pure-torch path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = Path("csrc")


def find_nvcc() -> str | None:
    for candidate in (
        os.environ.get("NVCC"),
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


class BuildPack(build_ext):
    """Builds each library, downgrading any build failure to a warning."""

    def build_extension(self, ext: Extension) -> None:
        try:
            if ext.name.endswith("_pack_cuda"):
                self._build_cuda(ext)
            else:
                super().build_extension(ext)
        except Exception as e:  # a missing compiler must never fail the install
            print(
                f"WARNING: specctl: could not build {ext.name} ({e}); "
                "the pure-torch pack path will be used",
                file=sys.stderr,
            )

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []  # not a Python module: no PyInit_ symbol to export

    def _build_cuda(self, ext: Extension) -> None:
        nvcc = find_nvcc()
        if nvcc is None or os.environ.get("SPECCTL_NO_CUDA_BUILD"):
            print("specctl: nvcc not found, skipping the CUDA pack kernel", file=sys.stderr)
            return
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("SPECCTL_CUDA_ARCHS", "80;90").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        cmd = [nvcc, "-O3", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden", *gencode]
        cmd += ["-o", str(target), *ext.sources]
        print(" ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)


def extensions() -> list[Extension]:
    native = Extension(
        "specctl._pack_native",
        sources=[str(CSRC / "pack.cpp")],
        language="c++",
        extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-pthread"],
        extra_link_args=["-pthread"],
        optional=True,
    )
    cuda = Extension("specctl._pack_cuda", sources=[str(CSRC / "pack_cuda.cu")], optional=True)
    if sysconfig.get_platform().startswith("win"):
        return []
    return [native, cuda]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildPack})
