"""MLP speculator export: vLLM's exact key set and config, refusals, tied slots, round trips."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from specctl.draft.mlp import MLPSpeculator, MLPSpeculatorConfig
from specctl.errors import CheckpointError, UsageError
from specctl.export import mlp
from specctl.export.io import family_of, read_draft_dir, write_dir
from specctl.export.serving import export_draft, import_eagle3, import_mlp

pytestmark = pytest.mark.unit

H, V = 16, 50


def _cfg(tie: bool = False, scale: bool = False, inner: int = 0, n: int = 3):
    return MLPSpeculatorConfig(
        emb_dim=H, inner_dim=inner, vocab_size=V, n_predict=n, tie_weights=tie, scale_input=scale
    )


def _params(cfg: MLPSpeculatorConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in MLPSpeculator(cfg).named_parameters()}


def _target(tmp: Path) -> Path:
    """Only what shaping an MLP speculator reads: the target's config.json."""
    d = tmp / "target"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"hidden_size": H, "vocab_size": V}))
    return d


def _ckpt(tmp: Path, cfg: MLPSpeculatorConfig, sd: dict[str, torch.Tensor] | None = None) -> Path:
    """A train-draft --draft mlp checkpoint dir: draft.safetensors + the resolved run config."""
    from specctl.train.run_config import DraftOptions, TrainDraftConfig

    run = TrainDraftConfig(
        target=str(_target(tmp)),
        draft_family="mlp",
        n_predict=cfg.n_predict,
        draft=DraftOptions(
            inner_dim=cfg.inner_dim, tie_weights=cfg.tie_weights, scale_input=cfg.scale_input
        ),
    )
    d = tmp / "ckpt"
    d.mkdir()
    save_file(sd if sd is not None else _params(cfg), str(d / "draft.safetensors"))
    (d / "config.json").write_text(json.dumps(dataclasses.asdict(run)))
    return d


@pytest.mark.parametrize("tie", [False, True])
def test_expected_keys_are_the_speculators_parameters(tie: bool) -> None:
    """The layout table == `MLPSpeculator.named_parameters()` (shared ones once, like vLLM's)."""
    cfg = _cfg(tie=tie, inner=24, n=4)
    want = {k: tuple(v.shape) for k, v in MLPSpeculator(cfg).named_parameters()}
    assert mlp.expected_shapes(cfg) == want
    if tie:
        assert {k for k in want if k.startswith(("emb.", "ln.", "proj."))} == {
            "emb.0.weight",
            "ln.0.weight",
            "ln.0.bias",
            "proj.0.weight",
            "proj.1.weight",
        }


@pytest.mark.parametrize("tie", [False, True])
def test_export_writes_vllm_layout_and_imports_back(tmp_path: Path, tie: bool) -> None:
    cfg = _cfg(tie=tie, scale=tie)
    sd = _params(cfg)
    out = tmp_path / "vllm"
    summary = export_draft(_ckpt(tmp_path, cfg, sd), "vllm", out)
    assert summary["family"] == "mlp" and summary["tensors"] == len(sd)
    conf = json.loads((out / "config.json").read_text())
    assert conf == {
        "architectures": ["MLPSpeculatorPreTrainedModel"],
        "model_type": "mlp_speculator",
        "emb_dim": H,
        "inner_dim": H,
        "vocab_size": V,
        "n_predict": 3,
        "top_k_tokens_per_head": [1, 1, 1],
        "n_candidates": 1,
        "tie_weights": tie,
        "scale_input": tie,
        "torch_dtype": "float32",
    }
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(sd) and all(torch.equal(written[k], sd[k]) for k in sd)
    # what eval-accept decodes with: the same speculator from the checkpoint and the export
    models = [
        mlp.load_speculator(f.cfg, f.state) for f in map(read_draft_dir, (tmp_path / "ckpt", out))
    ]
    a, b = (dict(m.named_parameters()) for m in models)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # import -> a specctl draft dir -> export again: byte-identical serving files
    imported = tmp_path / "imported"
    assert import_mlp(out, imported)["imported_from"] == "vllm"
    back = read_draft_dir(imported)
    assert (back.family, back.kind, back.cfg) == ("mlp", "specctl", cfg)
    again = tmp_path / "again"
    export_draft(imported, "vllm", again)
    for f in ("config.json", "model.safetensors"):
        assert (again / f).read_bytes() == (out / f).read_bytes()


@pytest.mark.parametrize("damage", ["leftover", "missing", "shape", "int", "untied-extra"])
def test_export_refuses_bad_weights(tmp_path: Path, damage: str) -> None:
    cfg = _cfg()
    sd = _params(cfg)
    if damage == "leftover":
        sd["head.3.weight"] = sd["head.0.weight"].clone()
    elif damage == "missing":
        del sd["ln.1.bias"]
    elif damage == "shape":
        sd["proj.1.weight"] = torch.zeros(H, H + 1)
    elif damage == "int":
        sd["emb.2.weight"] = sd["emb.2.weight"].long()
    else:  # a stray tensor with a non-vLLM name (vLLM would skip it silently)
        sd["speculator_norm.weight"] = torch.ones(H)
    with pytest.raises(CheckpointError) as e:
        export_draft(_ckpt(tmp_path, cfg, sd), "vllm", tmp_path / "out")
    assert {"leftover": "unexpected head.3", "missing": "missing ln.1.bias"}.get(damage, "") in str(
        e.value
    )
    assert not (tmp_path / "out").exists()


def test_tied_repeated_slots_and_prefix(tmp_path: Path) -> None:
    """A foreign tied dir with `speculator.` names and every slot written: copies dropped."""
    cfg = _cfg(tie=True)
    m = MLPSpeculator(cfg)
    full = {f"speculator.{k}": v.detach().clone() for k, v in m.state_dict().items()}
    assert "speculator.emb.2.weight" in full  # state_dict repeats shared modules
    write_dir(tmp_path / "foreign", mlp.vllm_config(cfg, "float32"), full)
    files = read_draft_dir(tmp_path / "foreign")
    assert set(files.state) == set(mlp.expected_shapes(cfg))
    full["speculator.emb.2.weight"] = full["speculator.emb.2.weight"] + 1  # no longer a copy
    write_dir(tmp_path / "bad", mlp.vllm_config(cfg, "float32"), full)
    with pytest.raises(CheckpointError, match=r"emb\.2\.weight differs from emb\.0\.weight"):
        read_draft_dir(tmp_path / "bad")


def test_other_layouts_and_wrong_import_are_one_line_errors(tmp_path: Path) -> None:
    ckpt = _ckpt(tmp_path, _cfg())
    assert family_of(ckpt) == "mlp"
    for to in ("sglang", "speculators", "hf"):
        with pytest.raises(UsageError, match="--to vllm"):
            export_draft(ckpt, to, tmp_path / to)
    assert export_draft(ckpt, None, tmp_path / "served")["layout"] == "vllm"  # the default
    with pytest.raises(UsageError, match="--from-mlp-speculator"):
        import_eagle3(tmp_path / "served", tmp_path / "e3")
    import_mlp(tmp_path / "served", tmp_path / "imported")
    with pytest.raises(UsageError, match="already a specctl draft"):
        import_mlp(tmp_path / "imported", tmp_path / "again")


def test_vllm_config_parsing(tmp_path: Path) -> None:
    """vLLM defaults: inner_dim 0 = emb_dim; unknown architectures refused."""
    cfg = mlp.parse_config(
        {"model_type": "mlp_speculator", "emb_dim": H, "inner_dim": 0, "vocab_size": V}
    )
    assert (cfg.inner_dim, cfg.n_predict, cfg.tie_weights) == (H, 3, False)
    with pytest.raises(CheckpointError, match="lacks 'emb_dim'"):
        mlp.parse_config({"model_type": "mlp_speculator", "vocab_size": V})
    with pytest.raises(CheckpointError, match="is not MLPSpeculatorPreTrainedModel"):
        mlp.parse_config({"architectures": ["Llama"], "model_type": "mlp_speculator"})
