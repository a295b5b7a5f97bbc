"""`specctl eval-accept` and `specctl export` as real subprocesses, on the tiny target and SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.goldens.tiny_target import build_tiny_target

pytestmark = pytest.mark.integration


def _random_draft(target: Path, out: Path, draft_vocab: int, seed: int = 0) -> Path:
    """A random EAGLE-3 draft for `target`, saved without embeddings (they come from the target)."""
    from specctl.draft.eagle3 import Eagle3Config, Eagle3Draft
    from specctl.draft.vocab import build_mapping
    from specctl.export.io import write_dir

    cfg = Eagle3Config.from_target_config(
        json.loads((target / "config.json").read_text()), draft_vocab_size=draft_vocab
    )
    torch.manual_seed(seed)
    draft = Eagle3Draft(cfg)
    m = build_mapping(torch.randint(0, 100, (cfg.vocab_size,)), draft_vocab)
    draft.set_vocab(m.d2t, m.t2d)
    state = {k: v for k, v in draft.state_dict().items() if k != "embed_tokens.weight"}
    write_dir(out, cfg.to_dict(), state)
    return out


def _summary(proc) -> dict:
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # stdout carries only the JSON line
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    target = build_tiny_target(root / "target")
    data = root / "prompts.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Question {i}: tell me about {w}"}]}
        for i, w in enumerate(["cats", "rain", "the sea", "numbers", "trees", "music"])
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "root": root,
        "target": target,
        "data": data,
        "draft": _random_draft(target, root / "ckpt", draft_vocab=64),
    }


def test_eval_accept_checkpoint_vs_export(tiny: dict[str, Path]) -> None:
    root = tiny["root"]
    args = [
        "--model",
        str(tiny["target"]),
        "--data",
        str(tiny["data"]),
        "--max-prompts",
        "4",
        "--max-new-tokens",
        "24",
        "--check-lossless",
        "--set",
        "threads=1",  # tiny model on a shared box: one thread avoids OpenMP spin-waits
        "--set",
        # fixed k: each run times its own verify curve, and cost-aware lengths cut on it, so
        # two runs could propose differently; checkpoint and export must decode alike
        "cost_aware=false",
    ]
    a = _summary(
        run_cli(
            "eval-accept",
            *args,
            "--draft",
            str(tiny["draft"]),
            "--tree",
            "--out",
            str(root / "rep-ckpt"),
            check=True,
            timeout=300,
        )
    )
    assert a["drafter"] == "eagle3" and a["prompts"] == 4
    variants = {"eagle3", "eagle3-tree", "eagle3-tree+lookup", "prompt-lookup", "eagle3+lookup"}
    assert a["lossless"] == {v: "4/4" for v in variants}
    assert 1.0 <= a["acceptance_length"] < 1.5 and len(a["accept_rate"]) == 4
    assert set(a["speedups"]) == {"target", *variants}
    rep = json.loads((root / "rep-ckpt/report.json").read_text())
    assert set(rep["rows"]["eagle3"]["time_ms_per_round"]) == {"draft", "verify", "overhead"}
    assert sum(rep["rows"]["eagle3"]["time_share"].values()) == pytest.approx(1.0)
    assert set(a["time_ms_per_round"]["eagle3"]) == {"draft", "verify", "overhead"}
    assert sum(a["k_histogram"]) == rep["rows"]["eagle3"]["rounds"]
    assert a["draft_naps"] == {"eagle3": 0, "eagle3+lookup": 0}  # fixed k: always drafts
    curve = a["verify_curve"]  # timed on this machine before decoding, in the report too
    assert curve["measured"] and len(curve["costs"]) == 8 and curve["costs"][0] == 1.0
    assert curve["shapes"][-1] == 8 and rep["verify_curve"] == curve
    # ... and refined by every decode-sized forward timed while decoding
    assert curve["observed"] > 50 and len(curve["final_costs"]) == 8
    assert curve["final_costs"][0] == 1.0 and curve["final_shapes"][-1] == 8
    assert set(curve["skinny_rows"]) <= set(range(1, 9))
    assert (root / "rep-ckpt/acceptance.png").read_bytes()[:4] == b"\x89PNG"

    exp = _summary(
        run_cli("export", str(tiny["draft"]), "--to", "vllm", str(root / "served"), check=True)
    )
    assert exp["layout"] == "vllm"
    b = _summary(
        run_cli(
            "eval-accept",
            *args,
            "--draft",
            str(root / "served"),
            "--out",
            str(root / "rep-served"),
            check=True,
            timeout=300,
        )
    )
    assert b["acceptance_length"] == a["acceptance_length"]  # greedy: same rounds, same counts
    assert b["accept_rate"] == a["accept_rate"]


def test_user_errors_are_one_line(tiny: dict[str, Path]) -> None:
    proc = run_cli(
        "eval-accept",
        "--model",
        str(tiny["target"]),
        "--data",
        str(tiny["data"]),
        "--temperature",
        "0.7",
        "--check-lossless",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "greedy" in proc.stderr
    proc = run_cli("eval-accept", "--model", str(tiny["target"]), "--adaptive-threshold", "1.5")
    assert proc.returncode == 2 and "adaptive-threshold" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli(
        "eval-accept",
        "--model",
        str(tiny["target"]),
        "--draft",
        str(tiny["root"]),
        "--data",
        str(tiny["data"]),
    )
    assert proc.returncode == 1 and "not a draft directory" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    bad = tiny["root"] / "bad"
    from safetensors.torch import load_file, save_file

    from specctl.export.io import write_dir

    state = load_file(str(tiny["draft"] / "model.safetensors"))
    state["midlayer.extra.weight"] = torch.zeros(2)
    write_dir(bad, json.loads((tiny["draft"] / "config.json").read_text()), state)
    save_file(state, str(bad / "model.safetensors"))
    proc = run_cli("export", str(bad), "--to", "sglang", str(tiny["root"] / "nope"))
    assert proc.returncode == 1 and "unexpected midlayer.extra.weight" in proc.stderr
    assert not (tiny["root"] / "nope").exists()


def test_eval_accept_sampling_runs(tiny: dict[str, Path]) -> None:
    from specctl.evaluate.run import EvalConfig, run_eval
    from specctl.evaluate.verifier import VERIFY_COSTS, VERIFY_SHAPES

    s = run_eval(
        EvalConfig(
            model=str(tiny["target"]),
            data=str(tiny["data"]),
            draft=str(tiny["draft"]),
            max_prompts=2,
            max_new_tokens=12,
            temperature=0.8,
            adaptive_threshold=0.05,
            threads=1,
            calibrate=False,
            out=str(tiny["root"] / "rep-sample"),
        )
    )
    assert s["lossless"] is None and s["acceptance_length"] >= 1.0
    assert s["verify_curve"] == {  # not timed: the curve stored from this project's CPU
        "measured": False,
        "costs": list(VERIFY_COSTS),
        "shapes": list(VERIFY_SHAPES),
        "skinny_rows": list(range(1, 9)),
    }
    assert len(s["k_histogram"]) == 5 and sum(s["k_histogram"]) > 0


def test_smollm2_lossless_mtbench(tmp_path: Path) -> None:
    """The real target: a random draft on 2 short MT-Bench prompts is lossless (greedy)."""
    from specctl.evaluate.run import EvalConfig, run_eval
    from specctl.target.models import resolve_model

    target = resolve_model("smollm2-135m")
    draft = _random_draft(target, tmp_path / "ckpt", draft_vocab=2048)
    s = run_eval(
        EvalConfig(
            model="smollm2-135m",
            draft=str(draft),
            max_prompts=2,
            max_new_tokens=10,
            check_lossless=True,
            prompt_lookup=False,
            hybrid=False,
            threads=1,
            # the stored curve: a curve timed on a loaded box can make q = 2 look free, and
            # then even a random draft's 1/2048 guesses "pay" (the timed path: tests above)
            calibrate=False,
            out=str(tmp_path / "rep"),
        )
    )
    assert s["lossless"] == {"eagle3": "2/2"}
    # a random draft never pays its verify: it naps most rounds
    assert s["draft_naps"]["eagle3"] >= 4, s["k_histogram"]
    rep = json.loads((tmp_path / "rep/report.json").read_text())
    assert set(rep["categories"]) == {"writing", "coding"}  # MT-Bench ids 81 and 121
