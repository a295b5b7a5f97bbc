"""Exports proven by real serving: vLLM loads specctl's SGLang- and speculators-format drafts.

Opt-in (marker `engines`, `.venv-vllm`). A SmolLM2-shaped draft (random layer, embedding and
head rows from the target, random vocab map, norm weights 1±0.1 so a misplaced norm shows):
- greedy speculative generation in vLLM equals the target's own greedy output (vLLM, no draft);
- vLLM's first-round draft logits (hooked on `runner.drafter.model`) equal specctl's
  `Eagle3Draft` logits on the same inputs (fp32, <= 1e-4), -inf pattern included.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.engines
PROMPTS = [[1, 9690, 198, 19556, 359, 260, 1115, 314, 4649, 47, 2, 198], list(range(300, 340))]


@pytest.fixture(scope="module")
def smol() -> Path:
    from specctl.target.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def ckpt(smol: Path, tmp_path_factory) -> Path:
    from specctl.draft.eagle3 import Eagle3Config, Eagle3Draft, load_target_rows
    from specctl.draft.vocab import build_mapping
    from specctl.export.io import write_dir

    cfg = Eagle3Config.from_target_config(
        json.loads((smol / "config.json").read_text()), draft_vocab_size=8192
    )
    torch.manual_seed(0)
    draft = Eagle3Draft(cfg)
    m = build_mapping(torch.randint(0, 1000, (cfg.vocab_size,)), cfg.draft_vocab_size)
    draft.set_vocab(m.d2t, m.t2d)
    embed, head = load_target_rows(smol)
    draft.init_from_target(embed, head)
    with torch.no_grad():
        for n, p in draft.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.9, 1.1)
    out = tmp_path_factory.mktemp("draft") / "ckpt"
    write_dir(out, {**cfg.to_dict(), "aux_layers": None}, draft.state_dict())
    return out


def _vllm(tmp: Path, target: Path, draft: Path | None, name: str) -> dict:
    args = tmp / f"{name}.json"
    args.write_text(
        json.dumps(
            {
                "target": str(target),
                "draft": draft and str(draft),
                "prompts": PROMPTS,
                "max_tokens": 24,
                "k": 3,
            }
        )
    )
    out = tmp / f"{name}.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.engines.vllm_spec", str(args), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


def _specctl_first_round(ckpt: Path, got: dict) -> torch.Tensor:
    """specctl's draft on vLLM's first-round inputs -> full-vocab logits of the last position."""
    from specctl.draft.eagle3 import DraftCache
    from specctl.export.io import load_draft, read_draft_dir

    draft = load_draft(read_draft_dir(ckpt)).float().eval()
    with torch.no_grad():
        h = draft.combine(got["aux"][None])  # [1, T, H]
        logits, _ = draft.decode(
            got["input_ids"][None].long(), h, got["positions"][None].long(), DraftCache()
        )
    last = logits[0, -1]  # [Vd]
    full = torch.full((draft.cfg.vocab_size,), float("-inf"))
    full[draft.to_target_ids(torch.arange(draft.cfg.draft_vocab_size))] = last
    return full


@pytest.fixture(scope="module")
def plain(smol: Path, tmp_path_factory) -> dict:
    """The target's own greedy output in vLLM (no draft)."""
    return _vllm(tmp_path_factory.mktemp("plain"), smol, None, "plain")


@pytest.mark.parametrize("layout", ["sglang", "speculators"])
def test_vllm_serves_the_export_exactly(
    layout: str, smol: Path, ckpt: Path, plain: dict, tmp_path: Path
) -> None:
    served = tmp_path / layout
    extra = ["--model", str(smol)] if layout == "speculators" else []
    proc = run_cli("export", str(ckpt), str(served), "--to", layout, *extra, timeout=200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    spec = _vllm(tmp_path, smol, served, layout)
    # 1. speculative greedy output == the target's own greedy output
    assert spec["outputs"] == plain["outputs"]
    assert spec["metrics"].get("spec_decode_num_drafts", 0) > 0  # the draft really ran
    # 2. first-round draft logits: vLLM == specctl (fp32)
    want = _specctl_first_round(ckpt, spec)
    got = spec["logits"][-1]
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    err = float((got[finite] - want[finite]).abs().max())
    m = spec["metrics"]
    al = 1 + m.get("spec_decode_num_accepted_tokens", 0) / max(m["spec_decode_num_drafts"], 1)
    print(f"[{layout}] first-round max|dlogit| {err:.2e}; vLLM acceptance length {al:.3f}")
    assert err <= 1e-4
    assert int(got.argmax()) == int(want.argmax())
