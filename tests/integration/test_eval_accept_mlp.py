"""An MLP speculator end to end as real processes: `train-draft --draft mlp` -> `export --to vllm`
-> `eval-accept --check-lossless` on the exported dir, with the same rows as for EAGLE-3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.goldens.tiny_target import build_tiny_target
from tests.unit.test_train_data import make_records

pytestmark = pytest.mark.integration
ENV = {"OMP_NUM_THREADS": "1", "SPECCTL_PACK": "torch"}


def _summary(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # stdout carries only the JSON line
    return json.loads(lines[0])


def test_trained_mlp_draft_exports_and_decodes_losslessly(tmp_path: Path) -> None:
    target = build_tiny_target(tmp_path / "target", num_layers=4)
    make_records(target, tmp_path / "recs", 8, T=16)
    run = tmp_path / "run"
    _summary(
        run_cli(
            "train-draft",
            "--draft",
            "mlp",
            "--target",
            str(target),
            "--from-dir",
            str(tmp_path / "recs"),
            "--out",
            str(run),
            "--max-steps",
            "2",
            env=ENV,
            timeout=300,
        )
    )
    # 1. vLLM's layout, the default for MLP drafts (others: tests/unit/test_mlp_export.py)
    served = tmp_path / "served"
    out = _summary(run_cli("export", str(run), str(served), env=ENV))  # no --to: vllm
    assert (out["family"], out["layout"], out["n_predict"]) == ("mlp", "vllm", 3)
    assert json.loads((served / "config.json").read_text())["model_type"] == "mlp_speculator"
    # 2. eval-accept on the exported dir: --k capped at n_predict, lossless, the usual rows
    data = tmp_path / "prompts.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Tell me about {w}"}]} for w in "abc"]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli(
        "eval-accept",
        "--model",
        str(target),
        "--draft",
        str(served),
        "--data",
        str(data),
        "--max-prompts",
        "3",
        "--max-new-tokens",
        "12",
        "--k",
        "5",
        "--adaptive-threshold",
        "0",
        "--check-lossless",
        "--out",
        str(tmp_path / "eval"),
        "--set",
        "threads=1",
        "--set",
        "cost_aware=false",  # full chains: the capped k is what is checked
        env=ENV,
        timeout=300,
    )
    s = _summary(proc)
    assert "capped at the MLP speculator's n_predict 3" in proc.stderr
    assert s["drafter"] == "mlp"
    assert s["lossless"] == {"mlp": "3/3", "prompt-lookup": "3/3", "mlp+lookup": "3/3"}
    assert set(s["speedups"]) == {"target", "mlp", "prompt-lookup", "mlp+lookup"}
    assert len(s["k_histogram"]) == 4 and s["k_histogram"][3] > 0  # full chains of 3 proposed
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["config"]["k"] == 3 and len(report["rows"]["mlp"]["accept_rate"]) == 3
