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
    draft: Annotated[
        str | None, _o("--draft", "Draft family: eagle3 (default) or mlp (MLP speculator).")
    ] = None,
    ttt_length: Annotated[int | None, _o("--ttt-length", "TTT unroll length (7).")] = None,
    n_predict: Annotated[int | None, _o("--n-predict", "--draft mlp: heads (3).")] = None,
    init_from: Annotated[
        Path | None, _o("--init-from", "Warm start: a run's best (or a checkpoint) weights only.")
    ] = None,
    draft_vocab_size: Annotated[
        str | None, _o("--draft-vocab-size", "N, or auto (coverage + cost model). Default 32000.")
    ] = None,
    vocab_from: Annotated[
        list[Path] | None,
        _o("--vocab-from", "Record dirs (repeatable) whose target tokens choose the vocab."),
    ] = None,
    eval_from: Annotated[
        Path | None, _o("--eval-from", "Record dir of another prompt source: picks best.")
    ] = None,
    patience: Annotated[
        int | None, _o("--patience", "Stop after N evals without a better held-out AL.")
    ] = None,
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
    """Train an EAGLE-3 draft or an MLP speculator; one JSON summary line on stdout.

    Other settings (grad_accum, epochs, heldout, eval_every, save_every, optim.*, draft.*,
    replay=N: with --store, train again on trained samples while no fresh one is ready)
    go through --config / --set. --draft mlp reads only last hidden states (records from
    `serve-target --features last` suffice); its knobs: --n-predict, --set draft.inner_dim=N,
    draft.tie_weights=true, draft.scale_input=true, mlp.head_weights=[1,1,1]. Examples:
      specctl train-draft --target smollm2-135m --from-dir recs/ --out runs/d1 --max-steps 500
      specctl train-draft --target smollm2-135m --store 127.0.0.1:7000 --out runs/d1 --nproc 2
      specctl train-draft --draft mlp --target smollm2-135m --from-dir recs/ --out runs/m1
      specctl train-draft --draft mlp ... --out runs/m2 --init-from runs/m1   # phase 2
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
        draft_family=draft, n_predict=n_predict, init_from=str(init_from) if init_from else None,
        draft__draft_vocab_size=_vocab_size(draft_vocab_size),
        draft__vocab_file=str(vocab) if vocab else None,
        draft__vocab_from=[str(d) for d in vocab_from] if vocab_from else None,
        eval_from=str(eval_from) if eval_from else None, patience=patience,
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
        stop = ", stopped early" if summary.get("stopped_early") else ""
        # an evaluated AL is >= 1; 0.0 means no held-out sample reached this trainer
        al = f"{summary['heldout_al']:.3f}" if summary["heldout_al"] else "n/a (none held out)"
        best = f"{summary['best_al']:.3f}" if summary["best_al"] else "n/a"
        log(
            f"done: {summary['steps']} steps{stop}, held-out sim AL {al}; "
            f"best {best} ({summary['best_by']}) at step {summary['best_step']}"
        )
        emit_summary(summary)


def _vocab_size(text: str | None) -> int | str | None:
    """--draft-vocab-size: a positive integer or `auto`."""
    if text is None or text == "auto":
        return text
    from specctl.errors import UsageError

    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--draft-vocab-size takes a number or auto, got {text!r}") from None
