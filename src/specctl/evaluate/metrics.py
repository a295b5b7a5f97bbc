"""Acceptance and speed numbers from a list of per-prompt `DecodeResult`s.

- acceptance length (AL) = tokens emitted per target verify round (the prefill's first token
  is not part of any round); the target alone has AL 1 by construction;
- per-position acceptance: `accept_rate[j]` = P(draft token j+1 accepted | it was proposed),
  `accept_rate_cond[j]` = P(token j+1 accepted | token j accepted), the EAGLE papers' alpha;
- tokens/s = all generated tokens / all wall time (prefill included) over the same prompts;
- where a round's time goes: draft / verify / overhead (accept, emit, crop: the loop's own
  Python) ms per round and their share; `k_histogram[j]` = rounds that proposed j tokens
  (adaptive k and prompt lookup propose fewer than k).
"""

from __future__ import annotations

from typing import Any

from specctl.evaluate.specdec import DecodeResult


def acceptance_length(results: list[DecodeResult]) -> float:
    """Tokens emitted per target verify round (0 when no round ran)."""
    rounds = sum(r.rounds for r in results)
    return sum(sum(r.emitted) for r in results) / rounds if rounds else 0.0


def summarize(results: list[DecodeResult], k: int) -> dict[str, Any]:
    tokens = sum(len(r.tokens) for r in results)
    wall = sum(r.total_s for r in results)
    rounds = sum(r.rounds for r in results)
    accepted = [a for r in results for a in r.accepted]
    proposed = [p for r in results for p in r.proposed]
    reached = [sum(p > j for p in proposed) for j in range(k)]
    got = [sum(a > j for a in accepted) for j in range(k)]
    hist = [0] * (k + 1)  # rounds emitting 1..k+1 tokens
    for r in results:
        for e in r.emitted:
            hist[min(e, k + 1) - 1] += 1
    k_hist = [0] * (k + 1)  # rounds proposing 0..k tokens
    for p in proposed:
        k_hist[min(p, k)] += 1
    prefill = sum(r.prefill_s for r in results)
    draft = sum(r.draft_s for r in results)
    verify = sum(r.verify_s for r in results)
    per_round = 1000.0 / rounds if rounds else 0.0
    split = {"draft": draft, "verify": verify, "overhead": wall - prefill - draft - verify}
    decode_s = sum(split.values())
    return {
        "prompts": len(results),
        "tokens": tokens,
        "wall_s": round(wall, 4),
        "tok_per_s": tokens / wall if wall else 0.0,
        "rounds": rounds,
        "acceptance_length": acceptance_length(results),
        "accept_rate": [g / n if n else None for g, n in zip(got, reached, strict=True)],
        "accept_rate_cond": [
            g / prev if prev else None for g, prev in zip(got, [reached[0], *got[:-1]], strict=True)
        ],
        "al_histogram": hist,
        "k_histogram": k_hist,
        "mean_k": sum(proposed) / len(proposed) if proposed else 0.0,
        "time_ms_per_round": {name: s * per_round for name, s in split.items()},
        "time_share": {name: s / decode_s if decode_s else 0.0 for name, s in split.items()},
        "prefill_s": round(prefill, 4),
    }


def add_speedups(rows: dict[str, dict[str, Any]], base: str = "target") -> None:
    """speedup = tok/s of a row over tok/s of the target alone, measured in the same run."""
    ref = rows[base]["tok_per_s"]
    for row in rows.values():
        row["speedup"] = row["tok_per_s"] / ref if ref else None
