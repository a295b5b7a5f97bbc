"""eval-accept: target + drafters over a prompt set, interleaved per prompt, one report.

Every prompt is decoded by the target alone and by each drafter in a rotating order, so
machine load hits all variants alike and the speed-up is a ratio measured in the same run
(absolute times on a shared CPU move by +-10 %). The first prompt is decoded once untimed
per variant to warm up kernels and allocators.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specctl.console import Progress, log
from specctl.errors import InputError, SpecctlError, UsageError
from specctl.evaluate import metrics, report
from specctl.evaluate.specdec import CostModel, DecodeResult, speculative_decode, target_decode
from specctl.evaluate.tree import Eagle3TreeDrafter, tree_decode
from specctl.evaluate.verifier import Verifier
from specctl.skinny import ALL_ROWS, set_default_rows, skinny_rows


@dataclass
class EvalConfig:
    model: str = "smollm2-135m"
    draft: str | None = None  # checkpoint or exported dir; None = baselines only
    data: str = "mtbench"
    max_prompts: int = 10
    max_new_tokens: int = 128
    k: int = 4
    # adaptive k (EAGLE-2): cut the chain below this cumulative confidence (0 = off)
    adaptive_threshold: float = 0.0
    # cost-aware length (specdec.CostModel): each chain is drafted and proposed only as far as
    # expected tokens per decode step rise on the verifier's cost curve
    cost_aware: bool = True
    # the chain's confidences as observed acceptance rates, learned from the rounds verified
    # so far (confidence.Calibration): a young or shifted draft stops paying for verifies
    learn_confidence: bool = False
    # cost-aware chains only: a draft that keeps proposing nothing sleeps for 1, 2, 4, .. 16
    # rounds instead of paying its read and first guess each round (Eagle3Drafter naps)
    naps: bool = True
    temperature: float = 0.0
    seed: int = 0
    pad_verify: bool = True
    skinny: bool = True  # target linears take specctl.skinny's path for decode / verify rows
    verify_shapes: tuple[int, ...] | None = None  # cheap verify q's (bench_decode.py); None:
    # the verifier's (measured at start, or VERIFY_SHAPES / VERIFY_SHAPES_MKL without calibrate)
    # time q = 1..8 target forwards both ways before decoding (6-9 s for SmolLM2 on 2 cores,
    # calibrate.py): each q's faster path (skinny linears or F.linear) and the verify cost
    # curve the cost-aware lengths and the padding read; false: skinny everywhere and the
    # curve stored from the EPYC of docs/benchmarks.md
    calibrate: bool = True
    prompt_lookup: bool = True  # the n-gram baseline row
    # a row where prompt lookup proposes when an n-gram of >= hybrid_min_ngram tokens repeats,
    # the draft otherwise (drafters.HybridDrafter)
    hybrid: bool = True
    hybrid_min_ngram: int = 1
    tree: bool = False  # add an EAGLE-2-style tree row (greedy): depth k, topk branching
    tree_topk: int = 3
    tree_budget: int = 7  # draft nodes per tree (verify q = budget + 1: 8 is a cheap shape)
    check_lossless: bool = False
    out: str = "eval-accept"
    threads: int | None = None
    engine: str = "hf"  # "vllm": also decode in vLLM, its AL beside ours (vllm_engine.py)


@dataclass
class EvalPrompt:
    ids: torch.Tensor  # [T]
    category: str | None


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Load, decode every prompt with every variant, write report + plot, return the summary."""
    for flag, value in (("--k", cfg.k), ("--max-prompts", cfg.max_prompts)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if cfg.max_new_tokens < 1 or cfg.temperature < 0:
        raise UsageError("--max-new-tokens must be at least 1 and --temperature at least 0")
    if cfg.verify_shapes is not None and (not cfg.verify_shapes or min(cfg.verify_shapes) < 2):
        raise UsageError("verify_shapes must be query lengths >= 2, e.g. --set verify_shapes=5,8")
    if not 0.0 <= cfg.adaptive_threshold < 1.0:
        raise UsageError("--adaptive-threshold must be in [0, 1) (0 = off)")
    if cfg.check_lossless and cfg.temperature > 0:
        raise UsageError("--check-lossless compares greedy outputs: use --temperature 0")
    if cfg.tree and (cfg.temperature > 0 or not cfg.draft):
        raise UsageError("--tree needs --draft and greedy decoding (--temperature 0)")
    if cfg.draft:  # a wrong --draft fails before the target loads
        from specctl.evaluate.setup import check_draft_family

        check_draft_family(cfg)
    if cfg.engine != "hf":
        from specctl.evaluate import vllm_engine

        vllm_engine.check_config(cfg)
    _check_writable(Path(cfg.out))
    threads = torch.get_num_threads()
    if cfg.threads:  # 1 is much faster for tiny models on a busy box (OpenMP spin-waits)
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)
        set_default_rows(ALL_ROWS)  # calibration may have narrowed the draft's skinny rows


def _check_writable(out: Path) -> None:
    """Fail before minutes of decoding, not when the report is written; create nothing yet."""
    from specctl.paths import unwritable_ancestor

    if (parent := unwritable_ancestor(out)) is not None:
        raise InputError(f"cannot create report directory {out}: {parent} is not writable")


def _run(cfg: EvalConfig) -> dict[str, Any]:
    from specctl.evaluate import setup

    target, tokenizer, model_path = setup.load_target(cfg.model)
    drafters = setup.build_drafters(cfg, target, model_path)
    cfg = setup.cap_k(cfg, drafters)
    verifier = Verifier(
        target,
        setup.aux_layers_for(drafters, target),
        last_hidden="mlp" in drafters,
        skinny=cfg.skinny,
    )
    prompts = setup.load_eval_prompts(cfg.data, tokenizer, cfg.max_prompts)
    curve = _calibrate(cfg, verifier, prompts[0].ids)
    if cfg.cost_aware:
        shapes = tuple(cfg.verify_shapes) if cfg.verify_shapes else None
        setup.use_cost(drafters, CostModel.of(verifier, cfg.pad_verify, shapes))
    eos = setup.eos_ids(tokenizer, target)
    names = ["target", *drafters]
    results: dict[str, list[DecodeResult]] = {n: [] for n in names}
    decode = _decoder(cfg, verifier, drafters, eos)
    for name in names:  # warm-up, untimed
        decode(name, prompts[0].ids, min(cfg.max_new_tokens, 3))
    with Progress("eval-accept", total=len(prompts)) as prog:
        for i, p in enumerate(prompts):  # rotating order: load hits every variant alike
            for name in names[i % len(names) :] + names[: i % len(names)]:
                results[name].append(decode(name, p.ids, cfg.max_new_tokens))
            prog.update(1, **{f"AL_{n}": metrics.acceptance_length(results[n]) for n in drafters})
    if verifier.curve is not None:  # where the verifies timed while decoding moved the curve
        curve["final_costs"] = list(verifier.verify_costs)
        curve["final_shapes"] = list(verifier.verify_shapes)
        curve["observed"] = verifier.curve.observed
        log(
            f"verify cost curve after {curve['observed']} timed decode forwards: "
            f"{' '.join(f'{c:.2f}' for c in curve['final_costs'])}; pad to {curve['final_shapes']}"
        )
    verifier.close()
    mismatches = _lossless(cfg, results, drafters)
    rows = {n: metrics.summarize(results[n], cfg.k) for n in names}
    for name, drafter in drafters.items():  # rounds an EAGLE-3 chain draft slept through
        naps = getattr(drafter, "naps", None)
        if naps is not None:
            rows[name]["draft_naps"] = naps
    metrics.add_speedups(rows)
    agreement = None
    if cfg.engine == "vllm":  # vLLM's own AL for the same draft and prompts, beside ours
        from specctl.evaluate import vllm_engine

        agreement = vllm_engine.add_row(cfg, rows, results, prompts, eos, model_path)
    return _write(cfg, rows, results, prompts, mismatches, model_path, agreement, curve)


def _calibrate(cfg: EvalConfig, verifier: Verifier, context: torch.Tensor) -> dict[str, Any]:
    """The verify cost curve the run decides with: measured here, or the stored constants."""
    if cfg.calibrate and cfg.engine == "hf":
        from specctl.evaluate import calibrate

        curve = calibrate.measure(verifier, context)
        calibrate.apply(verifier, curve)
        log(
            f"verify cost curve (q = 1..{len(curve.costs)}, decode steps of {curve.step_ms:.1f} ms;"
            f" F.linear step {curve.step_ms_f_linear:.1f} ms): "
            f"{' '.join(f'{c:.2f}' for c in curve.costs)}; pad to {list(curve.shapes)}; "
            f"skinny linears for q in {list(curve.skinny_rows)}"
        )
    return {
        "measured": verifier.curve is not None,
        "costs": list(verifier.verify_costs),
        "shapes": list(verifier.verify_shapes),
        "skinny_rows": sorted(skinny_rows(verifier.model)),
    }


def _decoder(cfg: EvalConfig, verifier: Verifier, drafters: dict[str, Any], eos: tuple[int, ...]):
    gen = torch.Generator().manual_seed(cfg.seed)
    shapes = tuple(cfg.verify_shapes) if cfg.verify_shapes else None  # None: the verifier's

    def decode(name: str, ids: torch.Tensor, max_new: int) -> DecodeResult:
        if isinstance(drafters.get(name), Eagle3TreeDrafter):  # alone or with lookup grafted on
            return tree_decode(
                verifier,
                drafters[name],
                ids,
                depth=cfg.k,
                max_new_tokens=max_new,
                eos_ids=eos,
                pad_verify=cfg.pad_verify,
            )
        if name == "target":
            return target_decode(
                verifier,
                ids,
                max_new_tokens=max_new,
                eos_ids=eos,
                temperature=cfg.temperature,
                gen=gen,
            )
        return speculative_decode(
            verifier,
            drafters[name],
            ids,
            k=cfg.k,
            max_new_tokens=max_new,
            eos_ids=eos,
            temperature=cfg.temperature,
            pad_verify=cfg.pad_verify,
            verify_shapes=shapes,
            gen=gen,
        )

    return decode


def _lossless(
    cfg: EvalConfig, results: dict[str, list[DecodeResult]], drafters: dict[str, Any]
) -> dict[str, int]:
    """Greedy: count prompts whose speculative text differs from the target's own."""
    if cfg.temperature > 0:
        return {}
    ref = [r.tokens for r in results["target"]]
    bad = {n: sum(r.tokens != t for r, t in zip(results[n], ref, strict=True)) for n in drafters}
    if cfg.check_lossless and any(bad.values()):
        which = ", ".join(f"{n} {c}/{len(ref)} prompts" for n, c in bad.items() if c)
        raise SpecctlError(
            f"lossless check failed: greedy speculative output differs from the target's ({which})"
        )
    return bad


def _write(
    cfg: EvalConfig,
    rows: dict[str, dict[str, Any]],
    results: dict[str, list[DecodeResult]],
    prompts: list[EvalPrompt],
    mismatches: dict[str, int],
    model_path: Path,
    agreement: dict[str, Any] | None = None,
    curve: dict[str, Any] | None = None,
) -> dict[str, Any]:
    cats = sorted({p.category for p in prompts if p.category})
    by_cat = {
        c: {
            n: metrics.summarize(
                [r for r, p in zip(rs, prompts, strict=True) if p.category == c], cfg.k
            )
            for n, rs in results.items()
        }
        for c in cats
    }
    for c in cats:
        metrics.add_speedups(by_cat[c])
    out_dir = Path(cfg.out)
    json_path, png_path = out_dir / "report.json", out_dir / "acceptance.png"
    full = {
        "config": {**cfg.__dict__, "model_path": str(model_path)},
        "rows": rows,
        "categories": by_cat,
        "lossless_mismatches": mismatches,
        "verify_curve": curve,
        **({"engine_agreement": agreement} if agreement else {}),
    }
    report.write_json(full, json_path)
    report.write_plot(rows, cfg.k, png_path)
    for line in report.table({n: r for n, r in rows.items() if r["time_ms_per_round"]}):
        log(line)
    if agreement:
        from specctl.evaluate.vllm_engine import log_comparison

        log_comparison(agreement, rows["vllm"])
    main = next((n for n in rows if n != "target"), "target")
    return {
        "drafter": main,
        "acceptance_length": rows[main]["acceptance_length"],
        "accept_rate": rows[main]["accept_rate"],
        "speedup": rows[main]["speedup"],
        "tok_per_s": {n: r["tok_per_s"] for n, r in rows.items()},
        "speedups": {n: r["speedup"] for n, r in rows.items()},
        "time_ms_per_round": {
            n: {part: round(ms, 2) for part, ms in r["time_ms_per_round"].items()}
            for n, r in rows.items()
        },
        "k_histogram": rows[main]["k_histogram"],
        "draft_naps": {n: r["draft_naps"] for n, r in rows.items() if "draft_naps" in r},
        "verify_curve": curve,
        "lossless": (
            None
            if cfg.temperature > 0
            else {n: f"{len(prompts) - c}/{len(prompts)}" for n, c in mismatches.items()}
        ),
        "prompts": len(prompts),
        "report": str(json_path),
        "plot": str(png_path),
        **({"engine_agreement": agreement} if agreement else {}),
    }
