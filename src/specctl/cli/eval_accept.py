"""`specctl eval-accept`: real speculative decoding with target + draft; acceptance and speed-up."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from specctl.cli.options import ConfigOpt, SetOpt


def command(
    model: Annotated[
        str | None, typer.Option(help="`smollm2-135m` (built-in) or a local HF folder.")
    ] = None,
    draft: Annotated[
        Path | None,
        typer.Option(
            help="EAGLE-3 or MLP speculator draft: a train-draft checkpoint or an exported dir "
            "(sglang/vllm/speculators/hf; MLP: vllm). The family is detected."
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="`mtbench` (default), `chatterbot`, or a dataset file/folder serve-target accepts."
        ),
    ] = None,
    max_prompts: Annotated[
        int | None, typer.Option("--max-prompts", help="Prompts, spread evenly over the dataset.")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", help="Tokens generated per prompt.")
    ] = None,
    k: Annotated[
        int | None,
        typer.Option("--k", help="Draft tokens per round (chain; MLP: capped at n_predict)."),
    ] = None,
    adaptive_threshold: Annotated[
        float | None,
        typer.Option(
            "--adaptive-threshold",
            help="Adaptive k (EAGLE-2): stop drafting when the draft's cumulative top-1 "
            "probability drops below this (default 0 = off). Each chain's length is chosen "
            "by the cost-aware rule anyway (expected tokens per decode step on the verify "
            "cost curve, timed on this machine before decoding; `--set calibrate=false` uses "
            "the stored curve); `--set cost_aware=false` with 0 always drafts k tokens.",
        ),
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="0 = greedy (lossless); >0 = speculative sampling.")
    ] = None,
    check_lossless: Annotated[
        bool,
        typer.Option(
            "--check-lossless",
            help="Fail (exit 1) if any greedy speculative output differs from the target's.",
        ),
    ] = False,
    tree: Annotated[
        bool,
        typer.Option(
            "--tree",
            help="Also decode with an EAGLE-2-style draft tree (greedy; depth --k, "
            "tree_topk/tree_budget via --set; cost-aware like the chain: it keeps only the "
            "nodes whose verify pays), and with prompt lookup's guesses grafted onto that "
            "tree (row eagle3-tree+lookup).",
        ),
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Report directory (report.json + acceptance.png).")
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help="`hf` (default) or `vllm`: also decode with the draft in vLLM (.venv-vllm) and "
            "report its AL beside ours (greedy; fixed k like vLLM: no cost-aware length, "
            "adaptive k off unless --adaptive-threshold).",
        ),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Decode prompts with the target alone, the draft, prompt lookup and both (interleaved).

    Reports acceptance length (tokens per target verify), per-position acceptance, tokens/s
    and the speed-up over the target alone measured in the same run, per MT-Bench category.

    Examples:
      specctl eval-accept --model smollm2-135m --draft runs/demo/ckpt --max-prompts 8
      specctl eval-accept --draft exported/ --check-lossless --max-new-tokens 64
      .venv-vllm/bin/specctl eval-accept --draft runs/demo/train --engine vllm --max-prompts 4
    """
    import os

    from specctl.config import resolve
    from specctl.console import emit_summary
    from specctl.evaluate.run import EvalConfig, run_eval

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at run time
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    cost_aware = False if engine == "vllm" else None  # vLLM drafts a fixed k: like for like
    cfg = resolve(
        EvalConfig,
        config,
        set_,
        model=model,
        draft=str(draft) if draft else None,
        data=data,
        max_prompts=max_prompts,
        max_new_tokens=max_new_tokens,
        k=k,
        adaptive_threshold=adaptive_threshold,
        cost_aware=cost_aware,
        temperature=temperature,
        check_lossless=check_lossless or None,
        tree=tree or None,
        out=str(out) if out else None,
        engine=engine,
    )
    emit_summary(run_eval(cfg))
