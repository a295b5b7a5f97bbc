"""Producer throughput on SmolLM2-135M (CPU fp32): specctl's loop vs a naive one, same run.

- `specctl`: the real `serve-target` loop (`target.producer._loop`): token-budget batches,
  forward hooks on 3 aux layers + the final norm, pack into a reused buffer; the sink drops
  the records (no store, no disk) so the figure is the producer's own, not a store's.
- `naive` (the baseline, ratio 1.0): one sample at a time with `output_hidden_states=True`
  (all 31 states materialised), `torch.cat` of the aux states, a fresh pack buffer each time.
- Both run in fp32 and bf16 (`serve-target --precision`; auto times the two, as printed).
- `--full` adds generation (regeneration's cost): useful tokens/s (pads excluded) of batched
  seeded sampling at batch 8 and 16 vs batch 1, interleaved (goal: >= 100 tok/s, 6x batch 1).

Figures: tokens/s and MB/s of records out. Compare ratios, never absolute rates across runs.

    .venv/bin/python bench/bench_producer.py [--quick] [--samples N] [--full]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _specctl(engine, prompts, n: int) -> dict:
    from specctl.console import Progress
    from specctl.target.producer import ServeTargetConfig, Totals, _loop
    from specctl.target.sinks import LocalSink, finished

    class MemorySink(LocalSink):
        """The producer's sink contract, in memory: sequential seqs, records dropped."""

        def __init__(self, limit: int) -> None:
            super().__init__()
            self.limit, self.next = limit, 0

        def lease(self, n: int) -> list[int] | None:
            seqs = list(range(self.next, min(self.next + n, self.limit)))
            self.next += len(seqs)
            return seqs or None

        def put(self, buf: torch.Tensor, epoch: int, index: int, T: int) -> Any:
            return finished(True)

    cfg = ServeTargetConfig(lease_size=8)
    totals = Totals()
    t0 = time.perf_counter()
    with Progress("bench-producer", total=n, every_s=60) as progress:
        _loop(cfg, engine, prompts, len(prompts), MemorySink(n), torch.bfloat16, totals, progress)
    return {"seconds": time.perf_counter() - t0, "tokens": totals.tokens, "bytes": totals.bytes}


def _naive(engine, prompts, n: int) -> dict:
    from specctl.pack import pack_record
    from specctl.target.template import tokenize_conversation

    tokens = nbytes = 0
    t0 = time.perf_counter()
    for i in range(n):
        s = tokenize_conversation(engine.tokenizer, prompts[i].messages)
        with torch.inference_mode():
            hs = engine.model(
                input_ids=torch.tensor([s.input_ids]), output_hidden_states=True
            ).hidden_states
        aux = torch.cat([hs[j + 1][0] for j in engine.aux_layers], dim=-1)  # [T, 3H]
        rec = pack_record(epoch=0, index=i, input_ids=torch.tensor(s.input_ids, dtype=torch.int32),
                          loss_mask=torch.tensor(s.loss_mask, dtype=torch.uint8),
                          aux_hidden=aux, last_hidden=hs[-1][0])  # fmt: skip
        tokens += len(s.input_ids)
        nbytes += rec.numel()
    return {"seconds": time.perf_counter() - t0, "tokens": tokens, "bytes": nbytes}


def _generation(engines: dict, prompts, new_tokens: int, reps: int) -> list[dict]:
    """Useful (non-pad) generated tokens/s at batch 1, 8 and 16, cases interleaved per rep.

    Each rep times one call per case (batch 1: one prompt, rotating; batch B: B prompts as
    one left-padded batch) and the table shows the median over reps of tokens/s, because
    on a shared box single calls stall for seconds. Sampling at T=0.7, top-p 0.95 (rows
    finish at different lengths, as in regeneration); the ratio is against fp32 batch 1.
    Three variants per batch: fp32 with the skinny linears (`specctl.skinny`, the fp32
    engine's default for steps of <= 8 rows), fp32 with plain `F.linear`, and bf16.
    """
    import statistics

    from specctl.skinny import use_skinny_linears
    from specctl.target.engines import SamplingParams
    from specctl.target.template import encode_text, render

    tok = engines["fp32"].tokenizer
    ids = [encode_text(tok, render(tok, p.messages[:1], add_generation_prompt=True))
           for p in prompts[:16]]  # fmt: skip
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=new_tokens)
    variants = {
        "fp32 skinny": ("fp32", True),
        "fp32 F.linear": ("fp32", False),
        "bf16": ("bf16", False),
    }
    cases = [(b, v) for v in variants for b in (1, 8, 16)]
    rates: dict[tuple[int, str], list[float]] = {c: [] for c in cases}
    made = dict.fromkeys(rates, 0)
    for e in engines.values():
        e.generate(ids[:2], SamplingParams(0.7, 0.95, 4), [0, 1])  # warm-up
    for rep in range(reps):
        for b, v in cases:
            name, sk = variants[v]
            engine = engines[name]
            if name == "fp32":
                use_skinny_linears(engine.model, sk)
            grp = [rep % 16] if b == 1 else list(range(b))
            t0 = time.perf_counter()
            got = engine.generate([ids[i] for i in grp], params, [rep * 100 + i for i in grp])
            n = sum(len(g) for g in got)
            rates[(b, v)].append(n / (time.perf_counter() - t0))
            made[(b, v)] += n
        print(f"  rep {rep}: " + ", ".join(f"b{b} {v} {r[-1]:.1f}" for (b, v), r in rates.items()),
              flush=True)  # fmt: skip
    use_skinny_linears(engines["fp32"].model, True)
    rows = [
        {
            "bench": "producer",
            "case": f"generate batch {b} {v} (useful tok/s, median of {reps})",
            "new_tokens": made[(b, v)],
            "tokens_per_s": statistics.median(r),
        }
        for (b, v), r in rates.items()
    ]
    for r in rows:
        r["ratio"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, print the table, return its rows (for bench/run.py)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples")
    ap.add_argument(
        "--samples", type=int, default=0, help="samples per case (0: 16 quick, 48 full)"
    )
    ap.add_argument("--full", action="store_true", help="also time batched vs batch-1 generation")
    args = ap.parse_args(argv)
    from specctl.precision import bf16_wins, forward_ms
    from specctl.target.data import load_prompts
    from specctl.target.engines.hf import HFEngine
    from specctl.target.models import resolve_model

    n = args.samples or (16 if args.quick else 48)
    path = resolve_model("smollm2-135m")
    engines = {p: HFEngine(path, device="cpu", precision=p) for p in ("fp32", "bf16")}
    ms = {p: forward_ms(e.model) for p, e in engines.items()}
    print(f"precision probe (what --precision auto times): fp32 {ms['fp32']:.0f} ms, "
          f"bf16 {ms['bf16']:.0f} ms -> auto picks "
          f"{'bf16' if bf16_wins(ms['fp32'], ms['bf16']) else 'fp32'}")  # fmt: skip
    prompts = load_prompts("chatterbot")[:n]
    _naive(engines["fp32"], prompts, 2)  # warm-up (allocator, oneDNN)
    base = _naive(engines["fp32"], prompts, n)
    _specctl(engines["bf16"], prompts, 2)
    ours = {p: _specctl(e, prompts, n) for p, e in engines.items()}
    rows = []
    for case, r in (
        ("naive: output_hidden_states, batch 1", base),
        ("specctl: hooks, batched (fp32)", ours["fp32"]),
        ("specctl: hooks, batched (bf16)", ours["bf16"]),
    ):
        rows.append(
            {
                "bench": "producer",
                "case": case,
                "samples": n,
                "tokens": r["tokens"],
                "tokens_per_s": r["tokens"] / r["seconds"],
                "mb_per_s": r["bytes"] / 1e6 / r["seconds"],
                "ratio": (r["tokens"] / r["seconds"]) / (base["tokens"] / base["seconds"]),
            }
        )
    if args.full:
        new, reps = (32, 3) if args.quick else (64, 5)
        rows += _generation(engines, load_prompts("chatterbot")[::97], new, reps)
    print(
        f"{'case':40s} {'tok/s':>9s} {'MB/s':>8s} {'ratio':>6s}   (threads={torch.get_num_threads()})"
    )
    for r in rows:
        mb = f"{r['mb_per_s']:8.2f}" if "mb_per_s" in r else f"{'':8s}"
        print(f"{r['case']:40s} {r['tokens_per_s']:9.1f} {mb} {r['ratio']:6.2f}")
    return rows


if __name__ == "__main__":
    main()
