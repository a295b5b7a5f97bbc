"""`specctl train-draft`: EAGLE-3 draft training from the store or a record directory.

Runs as one process, under `torchrun --nproc-per-node N`, or with `--nproc N` (re-executes
itself under torchrun). Heavy imports happen inside the command body.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from specctl.cli.options import ConfigOpt, PlanOpt, SetOpt, StoreOpt


def _o(flag: str, text: str) -> Any:
    return typer.Option(flag, help=text)


def command(
    target: Annotated[str, _o("--target", "Target model: alias (smollm2-135m) or HF folder.")],
    out: Annotated[Path, _o("--out", "Run directory: checkpoints, logs, vocab.")],
    store: StoreOpt = None,
    from_dir: Annotated[Path | None, _o("--from-dir", "Train from *.rec files instead.")] = None,
    ttt_length: Annotated[int | None, _o("--ttt-length", "TTT unroll length (7).")] = None,
    draft_vocab_size: Annotated[int | None, _o("--draft-vocab-size", "Default 32000.")] = None,
    vocab: Annotated[Path | None, _o("--vocab", "Reuse a vocab.safetensors mapping.")] = None,
    batch_size: Annotated[
        int | None, _o("--batch-size", "Samples per rank per micro-batch.")
    ] = None,
    lr: Annotated[float | None, _o("--lr", "Peak learning rate.")] = None,
    max_steps: Annotated[int | None, _o("--max-steps", "Optimizer steps (cosine horizon).")] = None,
    precision: Annotated[str | None, _o("--precision", "fp32 or bf16 (mixed).")] = None,
    max_wait: Annotated[float | None, _o("--max-wait", "Seconds to wait for records.")] = None,
    resume: Annotated[bool, _o("--resume", "Continue exactly from OUT/latest.")] = False,
    nproc: Annotated[int, _o("--nproc", "Launch N ranks with torchrun.")] = 0,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    plan: PlanOpt = False,
) -> None:
    """Train an EAGLE-3 draft; one JSON summary line on stdout.

    Other settings (grad_accum, epochs, heldout, eval_every, save_every, optim.*, draft.*)
    go through --config / --set. Examples:
      specctl train-draft --target smollm2-135m --from-dir recs/ --out runs/d1 --max-steps 500
      specctl train-draft --target smollm2-135m --store 127.0.0.1:7000 --out runs/d1 --nproc 2
    """
    from specctl.config import resolve, to_dict
    from specctl.console import emit_summary, log
    from specctl.errors import UsageError
    from specctl.train.run_config import TrainDraftConfig

    if nproc > 1 and "RANK" not in os.environ:
        from specctl.train.launch import relaunch_under_torchrun

        sys.exit(relaunch_under_torchrun(nproc, sys.argv[1:]))
    cfg = resolve(
        TrainDraftConfig, config, set_, target=target, out=str(out), store=store,
        from_dir=str(from_dir) if from_dir else None, ttt_length=ttt_length,
        draft__draft_vocab_size=draft_vocab_size, draft__vocab_file=str(vocab) if vocab else None,
        batch_size=batch_size, optim__lr=lr, max_steps=max_steps, precision=precision,
        max_wait_s=max_wait, resume=resume or None,
    )  # fmt: skip
    if cfg.store and cfg.from_dir:
        raise UsageError("give --store or --from-dir, not both")
    if plan:
        emit_summary({"plan": to_dict(cfg), "ranks": int(os.environ.get("WORLD_SIZE", 1))})
        return
    from specctl.train.loop import train_draft

    summary = train_draft(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        log(f"done: {summary['steps']} steps, held-out sim AL {summary['heldout_al']:.3f}")
        emit_summary(summary)
