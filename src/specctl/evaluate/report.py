"""The eval-accept report: one JSON file and one PNG (per-position acceptance, AL histogram).

matplotlib runs on the Agg backend (no display on servers and CI), selected before pyplot
is imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")


def table(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Printable lines: speed, and where a decode round's time goes (ms and share) per variant."""
    lines = [
        f"{'variant':14s} {'AL':>5s} {'tok/s':>6s} {'speedup':>7s} | per round: "
        f"{'draft ms':>13s} {'verify ms':>13s} {'overhead ms':>13s} | k proposed (0..k)"
    ]
    for name, r in rows.items():
        ms, share = r["time_ms_per_round"], r["time_share"]
        parts = " ".join(f"{ms[p]:6.1f} ({share[p]:4.0%})" for p in ("draft", "verify", "overhead"))
        k_hist = "" if name == "target" else f"{r['k_histogram']} mean {r['mean_k']:.2f}"
        lines.append(
            f"{name:14s} {r['acceptance_length']:5.2f} {r['tok_per_s']:6.2f} "
            f"{r['speedup'] or 0:7.3f} | {'':11s}{parts} | {k_hist}"
        )
    return lines


def write_plot(rows: dict[str, dict[str, Any]], k: int, path: Path) -> None:
    """Left: acceptance rate per draft position; right: share of rounds emitting n tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drafters = {name: row for name, row in rows.items() if name != "target"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    positions = list(range(1, k + 1))
    width = 0.8 / max(len(drafters), 1)
    for i, (name, row) in enumerate(drafters.items()):
        rates = [r if r is not None else float("nan") for r in row["accept_rate"]]
        ax1.plot(positions, rates, marker="o", label=f"{name} (AL {row['acceptance_length']:.2f})")
        hist = row["al_histogram"]
        total = sum(hist) or 1
        ax2.bar(
            [n + (i - (len(drafters) - 1) / 2) * width for n in range(1, k + 2)],
            [h / total for h in hist],
            width=width,
            label=name,
        )
    ax1.set(
        xlabel="draft position",
        ylabel="P(accepted | proposed)",
        ylim=(0, 1.05),
        xticks=positions,
        title="per-position acceptance",
    )
    ax2.set(
        xlabel="tokens emitted per verify round",
        ylabel="share of rounds",
        xticks=list(range(1, k + 2)),
        title="acceptance length histogram",
    )
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if drafters:
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
