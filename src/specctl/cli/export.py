"""`specctl export`: a draft checkpoint -> a validated serving directory (or an import)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def command(
    src: Annotated[
        Path,
        typer.Argument(
            help="Checkpoint dir (or, with --from-*, the dir to import).", show_default=False
        ),
    ],
    out: Annotated[Path, typer.Argument(help="New output directory.", show_default=False)],
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="sglang (default) | vllm (same SGLang-format dir) | speculators | hf "
            "(self-contained, with embeddings). MLP speculator drafts: vllm only (the default "
            "for them; MLPSpeculatorPreTrainedModel).",
        ),
    ] = None,
    from_eagle3: Annotated[
        bool,
        typer.Option(
            "--from-eagle3",
            help="Import SRC (SGLang/SpecForge or speculators format) into a specctl checkpoint OUT.",
        ),
    ] = False,
    from_mlp_speculator: Annotated[
        bool,
        typer.Option(
            "--from-mlp-speculator",
            help="Import SRC (vLLM / fms-extras MLPSpeculatorPreTrainedModel) into a specctl draft OUT.",
        ),
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(
            help="Target model: the verifier path for --to speculators; its embedding for --from-eagle3."
        ),
    ] = None,
    k: Annotated[
        int, typer.Option("--k", help="speculative_tokens written in the speculators config.")
    ] = 4,
) -> None:
    """Write a draft as the directory SGLang / vLLM load, validated (key set, shapes, vocab map).

    Examples:
      specctl export runs/demo/ckpt --to sglang served/
      specctl export runs/demo/ckpt --to speculators --model smollm2-135m served-spec/
      specctl export --from-eagle3 some-eagle3-dir/ warm-ckpt/ --model smollm2-135m
      specctl export runs/mlp --to vllm served-mlp/
      specctl export --from-mlp-speculator served-mlp/ mlp-draft/
    """
    from specctl.console import emit_summary
    from specctl.errors import UsageError
    from specctl.export.serving import export_draft, import_eagle3, import_mlp

    if from_eagle3 and from_mlp_speculator:
        raise UsageError("--from-eagle3 and --from-mlp-speculator exclude each other")
    if from_mlp_speculator:
        emit_summary(import_mlp(src, out))
        return
    if from_eagle3:
        embed = None
        if model:
            from specctl.draft.eagle3 import load_target_rows
            from specctl.target.models import resolve_model

            embed = load_target_rows(resolve_model(model))[0]
        emit_summary(import_eagle3(src, out, embed=embed))
        return
    emit_summary(export_draft(src, to, out, verifier=model, speculative_tokens=k))
