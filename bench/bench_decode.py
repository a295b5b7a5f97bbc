"""Where a speculative round's time goes on this CPU, as ratios of a plain decode step.

On SmolLM2-135M (`smollm2-135m`) in ONE run:

- `verify_cost`: one target forward of q new tokens on a ~300-token cache, q = 1..8, with
  the skinny linears (`specctl.skinny`, eval-accept's default) and with plain `F.linear`,
  interleaved; each relative to the `F.linear` q=1 step and to its own q=1. Picks the
  shapes worth padding verify to on this machine, for each path.
- `round`: per-round draft / verify / overhead (bookkeeping: accept, crop, emit) ms and
  their ratio to the plain decode step, for a random 8k-vocab EAGLE-3 draft (optionally
  with adaptive k; `-cost`: cost-aware lengths, `specdec.CostModel`, on the curve just
  measured) and for prompt lookup; with `--draft`, the trained draft the same ways and with
  lookup (`eagle3+lookup`, cost-aware; `-awake`: the same with the draft's naps off,
  `Eagle3Drafter`: it reads and guesses every round); the target alone gives the step. A `target-mkl`
  row decodes with `F.linear` instead of the skinny linears: the skinny gain, same run.

Variants are interleaved per prompt in rotating order; medians of per-call times are kept.
On an oversubscribed box (1-min load > cores) torch runs with 1 thread (OpenMP spin-waits
otherwise dominate); the row says which. Compare ratios, never absolute times across runs.

    .venv/bin/python bench/bench_decode.py [--quick] [--threads N] [--draft DIR]
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _threads(requested: int | None) -> int:
    if requested:
        return requested
    cores = os.cpu_count() or 1
    return 1 if os.getloadavg()[0] > cores else min(cores, 2)


def random_draft(target: Any, draft_vocab: int = 8192, seed: int = 0) -> Any:
    """A random EAGLE-3 draft shaped after `target`, head rows from the target (realistic scale)."""
    from specctl.draft.eagle3 import Eagle3Config, Eagle3Draft
    from specctl.draft.vocab import build_mapping

    cfg = Eagle3Config.from_target_config(target.config, draft_vocab_size=draft_vocab)
    torch.manual_seed(seed)
    draft = Eagle3Draft(cfg)
    counts = torch.randint(
        0, 1000, (cfg.vocab_size,), generator=torch.Generator().manual_seed(seed)
    )
    m = build_mapping(counts, draft_vocab)
    draft.set_vocab(m.d2t, m.t2d)
    embed = target.get_input_embeddings().weight.detach()
    draft.init_from_target(embed, target.get_output_embeddings().weight.detach())
    return draft.eval()


def verify_curve(verifier: Any, context: torch.Tensor, reps: int) -> tuple[list[dict], Any]:
    """Median ms of a q-token forward (q = 1..8) on `context`'s cache, skinny linears on and
    off, all shuffled together; ratios to the F.linear q=1 step and to the same path's q=1.
    Also the calibrated curve of those timings (each q's faster path), as eval-accept's."""
    from specctl.evaluate.calibrate import MAX_Q, cheap_shapes, curve_of, forward_ms

    med = forward_ms(verifier, context, reps, paths=(True, False))
    rows: list[dict] = []
    for sk in (True, False):
        own = {q: med[(sk, q)] for q in range(1, MAX_Q + 1)}
        rows += [
            {
                "bench": "verify_cost",
                "skinny": sk,
                "q": q,
                "ms": round(ms, 2),
                "ratio": round(ms / own[1], 3),  # to this path's own decode step
                "vs_mkl_step": round(ms / med[(False, 1)], 3),
            }
            for q, ms in own.items()
        ]
        # the cheapest q >= n for every n real positions: the shapes worth padding to here
        rows.append({"bench": "verify_shapes", "skinny": sk, "shapes": list(cheap_shapes(own))})
    return rows, curve_of(med)


def _variants(args: argparse.Namespace, target: Any, model_path: Any) -> dict[str, Any]:
    from specctl.evaluate.drafters import Eagle3Drafter, HybridDrafter, PromptLookupDrafter

    out: dict[str, Any] = {}
    draft = random_draft(target)
    for thr in args.thresholds:
        name = "eagle3-random-8k" + (f"-adaptive{thr:g}" if thr else "")
        out[name] = Eagle3Drafter(draft, **({"adaptive_threshold": thr} if thr else {}))
    out["eagle3-random-8k-cost"] = Eagle3Drafter(draft)  # cost model set with the verifier
    out["eagle3-random-8k-cost-awake"] = Eagle3Drafter(draft, naps=False)
    if args.draft:
        from pathlib import Path

        from specctl.evaluate.setup import load_eagle3

        trained, aux = load_eagle3(Path(args.draft), target)
        for thr in args.thresholds:
            out["eagle3" + (f"-adaptive{thr:g}" if thr else "")] = Eagle3Drafter(
                trained, aux, adaptive_threshold=thr
            )
        out["eagle3-cost"] = Eagle3Drafter(trained, aux)
        out["eagle3-cost-awake"] = Eagle3Drafter(trained, aux, naps=False)
        out["eagle3+lookup"] = HybridDrafter(
            PromptLookupDrafter(learn_confidence=True), Eagle3Drafter(trained, aux)
        )
        out["eagle3+lookup-awake"] = HybridDrafter(
            PromptLookupDrafter(learn_confidence=True), Eagle3Drafter(trained, aux, naps=False)
        )
    out["prompt-lookup"] = PromptLookupDrafter()
    return out


def round_split(args: argparse.Namespace) -> list[dict]:
    """Decode prompts with every variant (rotating order); per-round split as step ratios."""
    from specctl.evaluate import calibrate, metrics, setup
    from specctl.evaluate.specdec import CostModel, speculative_decode, target_decode
    from specctl.evaluate.verifier import Verifier
    from specctl.skinny import use_skinny_linears

    target, tok, model_path = setup.load_target("smollm2-135m")
    drafters = _variants(args, target, model_path)
    verifier = Verifier(target)
    prompts = [p.ids for p in setup.load_eval_prompts(args.data, tok, args.prompts)]
    context = torch.cat([p.ids for p in setup.load_eval_prompts("mtbench", tok, 3)])[:300]
    rows, curve = verify_curve(verifier, context, args.reps)
    calibrate.apply(verifier, curve)  # as eval-accept does: each q's faster path
    rows.append({"bench": "calibrated", "skinny_rows": list(curve.skinny_rows)})
    for name, drafter in drafters.items():
        if name.endswith(("-cost", "+lookup", "-awake")):
            drafter.cost = CostModel.of(verifier)
    names = ["target", "target-mkl", *drafters]
    res: dict[str, list[Any]] = {n: [] for n in names}

    def decode(name: str, ids: torch.Tensor, new: int) -> Any:
        if name == "target":
            return target_decode(verifier, ids, max_new_tokens=new)
        if name == "target-mkl":  # the same decode through F.linear
            use_skinny_linears(target, False)
            try:
                return target_decode(verifier, ids, max_new_tokens=new)
            finally:
                use_skinny_linears(target, True, curve.skinny_rows)
        return speculative_decode(verifier, drafters[name], ids, k=args.k, max_new_tokens=new)

    for n in names:  # warm-up
        decode(n, prompts[0], 4)
    for i, p in enumerate(prompts):
        for n in names[i % len(names) :] + names[: i % len(names)]:
            res[n].append(decode(n, p, args.new_tokens))
    summaries = {n: metrics.summarize(res[n], args.k) for n in names}
    step = summaries["target"]["time_ms_per_round"]["verify"]
    for n in names:
        s = summaries[n]
        draft, verify, ovh = (s["time_ms_per_round"][x] for x in ("draft", "verify", "overhead"))
        wall = draft + verify + ovh
        rows.append(
            {
                "bench": "round",
                "variant": n,
                "threads": torch.get_num_threads(),
                "step_ms": round(step, 2),
                "rounds": s["rounds"],
                "AL": round(s["acceptance_length"], 3),
                "draft_ms": round(draft, 2),
                "verify_ms": round(verify, 2),
                "overhead_ms": round(ovh, 3),
                "draft_ratio": round(draft / step, 3),
                "verify_ratio": round(verify / step, 3),
                "overhead_ratio": round(ovh / step, 4),
                "round_ratio": round(wall / step, 3),
                "k_hist": s["k_histogram"],
                # speed-up vs the target, same run
                "ratio": round(s["tok_per_s"] / summaries["target"]["tok_per_s"], 3),
            }
        )
    verifier.close()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="3 prompts x 24 tokens, 5 reps")
    ap.add_argument("--threads", type=int, default=None, help="default: 1 if oversubscribed")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--draft", default=None, help="also a trained draft dir (checkpoint/export)")
    ap.add_argument(
        "--thresholds", type=float, nargs="*", default=[0.0, 0.1], help="adaptive-k thresholds"
    )
    ap.add_argument("--prompts", dest="n_prompts", type=int, default=None)
    ap.add_argument("--data", default="mtbench", help="prompt set (eval-accept's --data)")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    args = ap.parse_args(argv)
    args.prompts, args.new_tokens, args.reps = (3, 24, 5) if args.quick else (8, 64, 20)
    args.prompts = args.n_prompts or args.prompts
    args.new_tokens = args.max_new_tokens or args.new_tokens
    before = torch.get_num_threads()
    torch.set_num_threads(_threads(args.threads))
    try:
        rows = round_split(args)
    finally:
        torch.set_num_threads(before)
    load = os.getloadavg()[0]
    print("verify forward, q new tokens:   skinny linears          F.linear")
    cost = {(r["skinny"], r["q"]): r for r in rows if r["bench"] == "verify_cost"}
    for q in range(1, 9):
        a, b = cost[(True, q)], cost[(False, q)]
        print(
            f"  q={q}: {a['ms']:7.2f} ms {a['ratio']:.3f}x ({a['vs_mkl_step']:.3f}x mkl step)"
            f"   {b['ms']:7.2f} ms {b['ratio']:.3f}x"
        )
    for r in rows:
        if r["bench"] == "verify_shapes":
            which = "skinny" if r["skinny"] else "F.linear"
            print(f"cheapest verify shapes, {which}: {r['shapes']}")
        if r["bench"] == "calibrated":
            print(f"rows below: skinny linears for q in {r['skinny_rows']} (the faster path)")
    print(f"(load {load:.1f} on {os.cpu_count()} cores; threads {rows[-1]['threads']})")
    hdr = (
        "variant                        AL   draft  verify  overhead  round  k-hist        speedup"
    )
    print(hdr)
    for r in rows:
        if r["bench"] == "round":
            print(
                f"{r['variant']:28s} {r['AL']:5.2f}  {r['draft_ratio']:.3f}  {r['verify_ratio']:.3f}"
                f"   {r['overhead_ratio']:.4f}  {r['round_ratio']:.3f}  {r['k_hist']!s:13s} "
                f"{r['ratio']:.3f}"
            )
    return rows


if __name__ == "__main__":
    main()
