"""Draft initialisation from the target, optimizer groups, LR schedule, vocab sources (train/setup.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from specctl.draft.eagle3 import load_target_rows
from specctl.train.parallel import Dist
from specctl.train.run_config import TrainDraftConfig
from specctl.train.setup import (
    build_model,
    build_optimizer,
    draft_config,
    lr_factor,
    resolve_vocab,
)
from tests.unit.test_train_data import make_records, make_target

pytestmark = pytest.mark.unit
ENV = Dist(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module", autouse=True)
def world_of_one() -> Iterator[None]:
    """resolve_vocab broadcasts its counts: a one-process gloo group, as a bare run has."""
    from specctl.train import parallel

    parallel.init_distributed()
    yield
    parallel.shutdown()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaForCausalLM

    path = make_target(tmp_path_factory.mktemp("init") / "target")
    model = LlamaForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.linspace(0.5, 3.0, model.config.hidden_size))
    model.save_pretrained(path)
    return path


def make(target: Path, tmp_path: Path, **draft: object) -> tuple[TrainDraftConfig, object]:
    cfg = TrainDraftConfig(target=str(target), out=str(tmp_path), max_steps=100)
    cfg.draft.draft_vocab_size = 40
    for k, v in draft.items():
        setattr(cfg.draft, k, v)
    dcfg = draft_config(cfg, target)
    counts = iter([(torch.arange(96), torch.ones(96))])
    mapping = resolve_vocab(cfg, ENV, dcfg, lambda: counts, tmp_path, None)
    return cfg, build_model(dcfg, mapping, target, cfg, ENV)


def test_head_and_norm_start_as_the_targets(target: Path, tmp_path: Path) -> None:
    cfg, model = make(target, tmp_path, init_norm=True)
    draft = model.draft  # type: ignore[attr-defined]
    _, head = load_target_rows(target)
    ids = draft.to_target_ids(torch.arange(40))
    assert torch.equal(draft.lm_head.weight, head[ids])
    assert torch.allclose(draft.norm.weight, torch.linspace(0.5, 3.0, 32))
    assert draft.lm_head.weight.requires_grad
    # So a draft hidden equal to the target's pre-norm hidden gives the target's logits.
    h = torch.randn(3, 32)
    xf = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + draft.norm.eps)
    expect = (xf * torch.linspace(0.5, 3.0, 32)) @ head.t()
    torch.testing.assert_close(draft.logits(h), expect[:, ids])

    _, frozen = make(target, tmp_path, freeze_head=True)  # norm: ones by default
    assert not frozen.draft.lm_head.weight.requires_grad  # type: ignore[attr-defined]
    assert torch.equal(frozen.draft.norm.weight, torch.ones(32))  # type: ignore[attr-defined]
    optim, _ = build_optimizer(frozen, cfg)  # type: ignore[arg-type]
    trained = {id(p) for g in optim.param_groups for p in g["params"]}
    assert id(frozen.draft.lm_head.weight) not in trained  # type: ignore[attr-defined]


def test_weight_decay_on_matrices_only(target: Path, tmp_path: Path) -> None:
    cfg, model = make(target, tmp_path)
    cfg.optim.weight_decay = 0.05
    optim, _ = build_optimizer(model, cfg)  # type: ignore[arg-type]
    by_id = {id(p): g["weight_decay"] for g in optim.param_groups for p in g["params"]}
    named = dict(model.named_parameters())  # type: ignore[attr-defined]
    assert by_id[id(named["draft.fc.weight"])] == 0.05
    assert by_id[id(named["draft.lm_head.weight"])] == 0.05
    assert by_id[id(named["draft.norm.weight"])] == 0.0
    assert by_id[id(named["draft.midlayer.hidden_norm.weight"])] == 0.0
    assert id(named["draft.embed_tokens.weight"]) not in by_id  # frozen


def test_schedule_warms_up_then_decays_to_min_lr(target: Path, tmp_path: Path) -> None:
    assert [lr_factor(s, 4, 20, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, 0.1) == pytest.approx(0.55)  # half-way: mid cosine
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 4, 20, 0.1) == pytest.approx(0.1)
    # The LambdaLR the loop steps follows it.
    cfg, model = make(target, tmp_path)
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.max_steps = 1e-3, 4, 20
    optim, sched = build_optimizer(model, cfg)  # type: ignore[arg-type]
    seen = []
    for _ in range(21):
        seen.append(sched.get_last_lr()[0])
        optim.step()
        sched.step()
    assert seen[0] == pytest.approx(2.5e-4) and seen[3] == pytest.approx(1e-3)
    assert seen[20] == pytest.approx(1e-4) and max(seen) == pytest.approx(1e-3)


def test_auto_size_and_vocab_from_counts_the_given_dirs(target: Path, tmp_path: Path) -> None:
    recs = make_records(target, tmp_path / "div", 6, T=12)
    cfg = TrainDraftConfig(target=str(target), out=str(tmp_path), max_steps=10)
    cfg.draft.draft_vocab_size = "auto"
    cfg.draft.vocab_from = [str(recs[0].parent)]
    dcfg = draft_config(cfg, target)

    def training_records():  # must not be counted when --vocab-from is given
        raise AssertionError("counted the training records")

    mapping = resolve_vocab(cfg, ENV, dcfg, training_records, tmp_path, None)
    assert mapping.info["vocab_source"] == "vocab-from"
    assert mapping.info["vocab_tokens_counted"] == 6 * 8  # the answers: 2/3 of T=12
    # The tiny vocab (96) is below every candidate: the whole vocab is the only choice.
    assert mapping.draft_vocab_size == dcfg.draft_vocab_size == 96
    assert (tmp_path / "vocab.safetensors").is_file()


def test_logit_lens_start_predicts_from_the_deepest_aux_state(target: Path, tmp_path: Path) -> None:
    from specctl.draft.eagle3 import DraftCache

    _, model = make(target, tmp_path, init_lens=True)
    draft = model.draft  # type: ignore[attr-defined]
    aux = torch.randn(1, 5, 3 * 32)  # three aux states, low -> high layer
    with torch.no_grad():
        h_out = draft.step(
            torch.arange(5)[None], draft.combine(aux), torch.arange(5)[None], DraftCache()
        )
    torch.testing.assert_close(h_out, aux[..., 64:])  # the deepest state, unchanged by the layer
    _, random_start = make(target, tmp_path)  # the default
    assert random_start.draft.fc.weight[:, :64].abs().sum() > 0  # type: ignore[attr-defined]
