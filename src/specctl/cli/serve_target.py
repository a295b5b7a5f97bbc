"""`specctl serve-target`: run a target model and stream its hidden states into the store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from specctl.cli.options import ConfigOpt, PlanOpt, SetOpt, StoreOpt


def command(
    model: Annotated[
        str | None, typer.Option(help="`smollm2-135m` (built-in) or a local HF folder.")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Prompt sources, optionally weighted: `chatterbot`, `self` (target-written, "
            "topic-steered), a .jsonl/.json/.parquet file or a saved dataset folder, e.g. "
            "`chatterbot:3,self:2,chats.jsonl:1`; `none` for self-prompts only. `mtbench` is "
            "the eval set (warns)."
        ),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help="hf (transformers, CPU/GPU), sglang (GPU) or vllm (CPU/GPU; make setup-vllm, "
            "run .venv-vllm/bin/specctl)."
        ),
    ] = None,
    store: StoreOpt = None,
    to_dir: Annotated[
        Path | None,
        typer.Option(
            "--to-dir", help="Write records as {epoch}_{index}.rec files here instead of the store."
        ),
    ] = None,
    aux_layers: Annotated[
        str | None,
        typer.Option(
            "--aux-layers",
            help="0-based decoder layers whose outputs are captured, e.g. 1,14,26 [default: 1, N/2-1, N-4].",
        ),
    ] = None,
    features: Annotated[
        str | None,
        typer.Option(
            "--features",
            help="all: aux + last hidden states (EAGLE-3); last: last hidden only (MLP "
            "speculator; 1/(k+1) of the bytes).",
        ),
    ] = None,
    regenerate: Annotated[
        bool | None,
        typer.Option(
            "--regenerate/--no-regenerate",
            help="The target rewrites every assistant turn before capture.",
        ),
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Sampling temperature for regeneration (0 = greedy).")
    ] = None,
    top_p: Annotated[
        float | None, typer.Option("--top-p", help="Nucleus sampling for regeneration.")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", help="Longest regenerated answer.")
    ] = None,
    self_prompts: Annotated[
        int | None,
        typer.Option(
            "--self-prompts",
            help="Self-prompts per epoch (the target writes N user prompts and answers them).",
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Run seed; each sample draws from hash(seed, epoch, index).")
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(help="Passes over the prompts; 0: until --max-samples or the trainer ends."),
    ] = None,
    max_samples: Annotated[
        int | None,
        typer.Option(
            "--max-samples", help="Stop after this many samples (all producers together)."
        ),
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="Record dtype: bf16 or fp32.")] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="Compute dtype of the hf engine: auto (GPU bf16; CPU the faster of fp32 and "
            "bf16, timed at start: bf16 wins 2-3x with AMX, loses ~6x without AVX512-BF16), "
            "fp32 or bf16."
        ),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    plan: PlanOpt = False,
) -> None:
    """Capture EAGLE-3 aux + last hidden states of a target model and publish them as records.

    Examples:
      specctl serve-target --model smollm2-135m --data chatterbot --store 127.0.0.1:7000
      specctl serve-target --data chatterbot:1,self:1 --regenerate --temperature 0.7 --epochs 0
    Start it N times against one store: producers lease disjoint prompts. With --epochs 0
    and temperature > 0 each epoch regenerates fresh answers until the trainer finishes.
    """
    import os

    from specctl.config import resolve
    from specctl.console import emit_summary
    from specctl.errors import UsageError
    from specctl.target.producer import ServeTargetConfig, config_dict, run

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at run time
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        layers = [int(x) for x in aux_layers.replace(",", " ").split()] if aux_layers else None
    except ValueError:
        raise UsageError(f"--aux-layers must be integers, got {aux_layers!r}") from None
    cfg = resolve(
        ServeTargetConfig,
        config,
        set_,
        model=model,
        engine=engine,
        to_dir=to_dir,
        aux_layers=layers,
        features=features,
        regenerate=regenerate,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        self_prompts=self_prompts,
        seed=seed,
        epochs=epochs,
        max_samples=max_samples,
        dtype=dtype,
        precision=precision,
    )
    if data is not None:
        cfg.data = None if data.lower() == "none" else data
    if plan:
        emit_summary({"plan": config_dict(cfg), "store": store})
        return
    emit_summary(run(cfg, store))
