"""`eval-accept --engine vllm`: vLLM's own acceptance length beside specctl's, same draft/prompts.

Opt-in (marker `engines`, `.venv-vllm`). The draft is really trained (serve-target --to-dir
on a tiny random target, then train-draft --from-dir): a random target's greedy text is so
repetitive that 16 steps reach high acceptance, so both engines' counts cover accepted
tokens at every draft position, not just the all-rejected path an untrained draft gives.
The tiny target has head_dim 32 (vLLM's CPU attention has no kernel for the usual 16).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from tests.conftest import run_cli

pytestmark = pytest.mark.engines
K = 4


def _build_target(folder: Path) -> Path:
    """Random Llama (8 layers, H=128, head_dim 32) + the tiny byte tokenizer of tests/goldens."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.goldens.tiny_target import build_tokenizer

    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _ok(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny target, a draft trained on its own greedy answers)."""
    root = tmp_path_factory.mktemp("eval-vllm")
    model = _build_target(root / "model")
    env = {"OMP_NUM_THREADS": "1"}
    _ok(
        run_cli(
            *("serve-target", "--model", str(model), "--data", "chatterbot", "--regenerate"),
            *("--max-new-tokens", "48", "--max-samples", "64", "--to-dir", str(root / "recs")),
            env=env,
            timeout=300,
        )
    )
    _ok(
        run_cli(
            *("train-draft", "--target", str(model), "--from-dir", str(root / "recs")),
            *("--out", str(root / "run"), "--max-steps", "200", "--draft-vocab-size", "128"),
            *("--ttt-length", "3", "--batch-size", "4", "--lr", "3e-3"),
            env=env,
            timeout=300,
        )
    )
    return model, root / "run"


def test_vllm_al_agrees_with_specctl(trained: tuple[Path, Path], tmp_path: Path) -> None:
    model, draft = trained
    proc = run_cli(
        *("eval-accept", "--model", str(model), "--draft", str(draft), "--engine", "vllm"),
        *("--data", "chatterbot", "--max-prompts", "3", "--max-new-tokens", "48", "--k", str(K)),
        *("--set", "prompt_lookup=false", "--out", str(tmp_path / "eval")),
        timeout=500,
    )
    summary = _ok(proc)
    agree = summary["engine_agreement"]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    ours, theirs = report["rows"]["eagle3"], report["rows"]["vllm"]
    print(f"AL specctl {ours['acceptance_length']:.3f} vLLM {theirs['acceptance_length']:.3f}")
    print(json.dumps(agree))
    # 1. both rows, side by side, from one command
    assert report["engine_agreement"] == agree
    assert theirs["rounds"] > 0 and theirs["tokens"] == ours["tokens"]
    assert len(theirs["accept_rate"]) == K and sum(theirs["al_histogram"]) == theirs["rounds"]
    assert report["config"]["adaptive_threshold"] == 0.0  # like for like: fixed k
    assert report["config"]["cost_aware"] is False
    assert ours["k_histogram"][K] >= 0.8 * ours["rounds"]  # only the last rounds are cut short
    # 2. the draft is good enough that accepted tokens are really counted (not AL 1 vs 1)
    assert theirs["acceptance_length_vllm"] > 1.3 and theirs["accept_rate"][K - 1] > 0.1
    # 3. same greedy text as specctl's target, and ALs within 5 %
    assert agree["vllm_text_equals_target"] == "3/3"
    assert agree["engine_agreement"] is True and agree["al_diff"] <= 0.05, agree
    # 4. counted vLLM's way on both sides (its last round counts a full k): close, not equal
    assert agree["al_diff_vllm_convention"] <= 0.05, agree
    assert any(ln.startswith("vllm ") for ln in proc.stderr.splitlines()), proc.stderr[-2000:]
