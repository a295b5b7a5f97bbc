"""`--nproc N`: re-run the same command line under torchrun (stdlib only, no torch import)."""

from __future__ import annotations

import subprocess
import sys


def relaunch_under_torchrun(nproc: int, argv: list[str]) -> int:
    """Run `specctl ARGV` (minus --nproc) as N torchrun ranks; returns torchrun's exit code."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    code = "import sys; from specctl.cli import main; sys.argv[0] = 'specctl'; main()"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "--no-python",
        sys.executable,
        "-c",
        code,
        *args,
    ]
    return subprocess.call(cmd)
