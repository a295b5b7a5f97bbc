"""`--nproc N`: re-run the same command line under torchrun (stdlib only, no torch import)."""

from __future__ import annotations

import subprocess
import sys
import tempfile


def relaunch_under_torchrun(nproc: int, argv: list[str]) -> int:
    """Run `specctl ARGV` (minus --nproc) as N torchrun ranks; returns torchrun's exit code.

    torchrun's agent makes a `torchelastic_*` log dir in the temp dir and never removes it:
    it gets one of ours, removed when torchrun exits."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    code = "import sys; from specctl.cli import main; sys.argv[0] = 'specctl'; main()"
    with tempfile.TemporaryDirectory(prefix="specctl-torchrun-") as logs:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            f"--log-dir={logs}",
            "--no-python",
            sys.executable,
            "-c",
            code,
            *args,
        ]
        return subprocess.call(cmd)
