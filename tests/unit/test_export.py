"""Export layouts: exact key names and config fields, refusal of bad checkpoints, import round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from specctl.draft.eagle3 import Eagle3Config, Eagle3Draft
from specctl.draft.vocab import build_mapping
from specctl.errors import CheckpointError
from specctl.export import layout
from specctl.export.io import read_draft_dir, write_dir
from specctl.export.serving import export_draft, import_eagle3

pytestmark = pytest.mark.unit

CFG = Eagle3Config(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rope_theta=1e5,
    vocab_size=100,
    draft_vocab_size=20,
    max_position_embeddings=512,
)

LAYER_KEYS = (
    {f"self_attn.{p}_proj.weight" for p in "qkvo"}
    | {f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    | {f"{n}.weight" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm")}
)
TOP_KEYS = {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"}


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    draft = Eagle3Draft(CFG)
    counts = torch.randint(0, 1000, (CFG.vocab_size,))
    m = build_mapping(counts, CFG.draft_vocab_size)
    draft.set_vocab(m.d2t, m.t2d)
    with torch.no_grad():
        for n, p in draft.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.9, 1.1)  # a misplaced norm would show
    return {k: v.clone() for k, v in draft.state_dict().items()}


def _ckpt(tmp: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    out = tmp / "ckpt"
    write_dir(out, {**CFG.to_dict(), "aux_layers": None}, state or _state())
    return out


def _target(tmp: Path) -> Path:
    d = tmp / "target"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 8}
        )
    )
    return d


@pytest.mark.parametrize("to", ["sglang", "vllm"])
def test_sglang_layout(tmp_path: Path, to: str) -> None:
    state = _state()
    summary = export_draft(_ckpt(tmp_path, state), to, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    cfg = json.loads((tmp_path / "out/config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert cfg["tie_word_embeddings"] is False
    assert (cfg["vocab_size"], cfg["draft_vocab_size"], cfg["rope_theta"]) == (100, 20, 1e5)
    assert cfg["num_hidden_layers"] == 1 and cfg["head_dim"] == 8
    assert "norm_output" not in cfg and not any("aux" in k for k in cfg)
    weights = load_file(str(tmp_path / "out/model.safetensors"))
    assert set(weights) == TOP_KEYS | {f"midlayer.{k}" for k in LAYER_KEYS}  # no embed_tokens
    assert weights["d2t"].dtype == torch.int64 and weights["t2d"].dtype == torch.bool
    assert torch.equal(weights["midlayer.hidden_norm.weight"], state["midlayer.hidden_norm.weight"])
    assert summary["tensors"] == len(weights)


def test_speculators_layout(tmp_path: Path) -> None:
    target = _target(tmp_path)
    export_draft(
        _ckpt(tmp_path), "speculators", tmp_path / "out", verifier=str(target), speculative_tokens=3
    )
    cfg = json.loads((tmp_path / "out/config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle3"
    assert cfg["norm_before_residual"] is False and cfg["norm_output"] is False
    assert cfg["eagle_aux_hidden_state_layer_ids"] is None
    spec = cfg["speculators_config"]
    assert spec["proposal_methods"][0]["speculative_tokens"] == 3
    assert spec["verifier"]["name_or_path"] == str(target.resolve())
    layer = cfg["transformer_layer_config"]
    assert layer["vocab_size"] == 100 and layer["rope_parameters"]["rope_theta"] == 1e5
    weights = load_file(str(tmp_path / "out/model.safetensors"))
    assert set(weights) == TOP_KEYS | {f"layers.0.{k}" for k in LAYER_KEYS}


def test_hf_layout_is_self_contained(tmp_path: Path) -> None:
    export_draft(_ckpt(tmp_path), "hf", tmp_path / "out")
    weights = load_file(str(tmp_path / "out/model.safetensors"))
    assert "embed_tokens.weight" in weights and len(weights) == 16


@pytest.mark.parametrize("damage", ["leftover", "missing", "shape", "d2t-absolute", "dtype"])
def test_refuses_bad_checkpoint(tmp_path: Path, damage: str) -> None:
    state = _state()
    if damage == "leftover":
        state["midlayer.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    elif damage == "missing":
        del state["midlayer.hidden_norm.weight"]
    elif damage == "shape":
        state["fc.weight"] = torch.zeros(32, 64)
    elif damage == "d2t-absolute":  # target ids instead of offsets
        state["d2t"] = state["d2t"] + torch.arange(CFG.draft_vocab_size)
    else:
        state["t2d"] = state["t2d"].long()
    ckpt = _ckpt(tmp_path, state)
    with pytest.raises(CheckpointError):
        export_draft(ckpt, "sglang", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_nonempty_output(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out/x").write_text("")
    with pytest.raises(CheckpointError, match="not empty"):
        export_draft(_ckpt(tmp_path), "sglang", tmp_path / "out")


@pytest.mark.parametrize("fmt", ["sglang", "speculators"])
def test_import_roundtrip(tmp_path: Path, fmt: str) -> None:
    state = _state()
    target = _target(tmp_path)
    export_draft(_ckpt(tmp_path, state), fmt, tmp_path / "served", verifier=str(target))
    embed = state["embed_tokens.weight"]
    summary = import_eagle3(tmp_path / "served", tmp_path / "warm", embed=embed)
    assert summary["imported_from"] == fmt and summary["has_embed"]
    back = read_draft_dir(tmp_path / "warm")
    assert back.kind == "specctl" and back.cfg == CFG
    assert set(back.state) == set(state)
    assert all(torch.equal(back.state[k], v) for k, v in state.items())
    # and the warm start exports to the same serving files again
    export_draft(tmp_path / "warm", fmt, tmp_path / "again", verifier=str(target))
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("served", "again"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "served/config.json").read_text() == (
        tmp_path / "again/config.json"
    ).read_text()


def test_import_reads_foreign_sglang_dir(tmp_path: Path) -> None:
    """A SpecForge-style dir written by hand (not by us), bf16, with SGLang's fields."""
    state = {
        k: (v.bfloat16() if v.is_floating_point() else v)
        for k, v in _state().items()
        if k != "embed_tokens.weight"
    }
    src = tmp_path / "specforge"
    src.mkdir()
    save_file(state, str(src / "model.safetensors"))
    (src / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLMEagle3"],
                "model_type": "llama",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "num_hidden_layers": 1,
                "rms_norm_eps": 1e-5,
                "rope_theta": 1e5,
                "max_position_embeddings": 512,
                "vocab_size": 100,
                "draft_vocab_size": 20,
                "tie_word_embeddings": False,
                "torch_dtype": "bfloat16",
            }
        )
    )
    import_eagle3(src, tmp_path / "warm")
    back = read_draft_dir(tmp_path / "warm")
    assert back.cfg == CFG and layout.EMBED not in back.state
    assert back.state["fc.weight"].dtype == torch.bfloat16


def test_import_refuses_eagle31_flags(tmp_path: Path) -> None:
    export_draft(
        _ckpt(tmp_path), "speculators", tmp_path / "served", verifier=str(_target(tmp_path))
    )
    cfg = json.loads((tmp_path / "served/config.json").read_text())
    cfg["norm_before_residual"] = True
    (tmp_path / "served/config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="norm_before_residual"):
        import_eagle3(tmp_path / "served", tmp_path / "warm")


@pytest.mark.parametrize("written", [64, "auto"])
def test_reads_train_draft_checkpoint(tmp_path: Path, written: int | str) -> None:
    """A run dir written by train/checkpoint.py itself: its `latest` exports and loads.

    With `--draft-vocab-size auto` the run config keeps "auto" (resume re-reads the mapping);
    the size the trainer chose is the weights' (64 here, not the 96 "auto" alone would give).
    """
    import dataclasses

    from specctl.draft.vocab import VocabMapping
    from specctl.export.io import load_draft
    from specctl.train.checkpoint import TrainerState, write_checkpoint
    from specctl.train.run_config import DraftOptions, TrainDraftConfig
    from specctl.train.setup import draft_config
    from tests.goldens.tiny_target import build_tiny_target

    target = build_tiny_target(tmp_path / "target")
    run = TrainDraftConfig(
        target=str(target), out=str(tmp_path / "run"), draft=DraftOptions(draft_vocab_size=64)
    )
    dcfg = draft_config(run, target)
    draft = Eagle3Draft(dcfg)
    m = build_mapping(torch.randint(0, 50, (dcfg.vocab_size,)), 64)
    draft.set_vocab(m.d2t, m.t2d)
    as_written = dataclasses.asdict(run)
    as_written["draft"]["draft_vocab_size"] = written
    (tmp_path / "run.json").write_text(json.dumps(as_written))
    VocabMapping(m.d2t, m.t2d, m.counts).save(tmp_path / "vocab.safetensors")
    write_checkpoint(
        tmp_path / "run",
        TrainerState(step=10),
        dict(draft.state_dict()),
        {},
        tmp_path / "run.json",
        tmp_path / "vocab.safetensors",
        best=False,
    )
    (tmp_path / "run/config.json").write_text(json.dumps(as_written))  # as the trainer
    files = read_draft_dir(tmp_path / "run")
    assert files.cfg == dcfg and files.meta["target_num_layers"] == 8
    export_draft(tmp_path / "run", "sglang", tmp_path / "out")
    cfg = json.loads((tmp_path / "out/config.json").read_text())
    tcfg = json.loads((target / "config.json").read_text())
    assert cfg["vocab_size"] == tcfg["vocab_size"] and cfg["hidden_size"] == tcfg["hidden_size"]
    loaded = load_draft(read_draft_dir(tmp_path / "out"), embed=draft.embed_tokens.weight.detach())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in draft.state_dict().items())
