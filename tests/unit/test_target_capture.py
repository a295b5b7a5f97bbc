"""Hooked aux/last states equal `output_hidden_states=True` exactly (fp32), pads stripped."""

from __future__ import annotations

import pytest
import torch

from specctl.errors import InputError
from specctl.target.engines import check_aux_layers, default_aux_layers
from specctl.target.engines.hf import HFEngine, pad_batch, token_batches
from specctl.target.template import Tokenized, tokenize_conversation
from tests.goldens.tiny_target import CONVERSATIONS, build_tiny_target, one_torch_thread

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)
pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> HFEngine:
    folder = build_tiny_target(tmp_path_factory.mktemp("tiny"), num_layers=8)
    return HFEngine(folder, device="cpu", aux_layers=None, token_budget=10_000)


def _samples(engine: HFEngine, convs) -> list[Tokenized]:
    return [tokenize_conversation(engine.tokenizer, c) for c in convs]


def _reference(engine: HFEngine, samples: list[Tokenized]):
    """The same padded batch through output_hidden_states=True (all N+1 states)."""
    ids, mask = pad_batch([s.input_ids for s in samples], engine.pad_id, left=False)
    with torch.inference_mode():
        out = engine.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states


def _check_exact(engine: HFEngine, samples: list[Tokenized]) -> None:
    got = engine.capture(samples)
    hs = _reference(engine, samples)
    assert len(hs) == engine.num_layers + 1
    # HF Llama's last entry is the post-norm state: check that premise, not just assume it
    base = engine.model.get_decoder()
    with torch.inference_mode():
        assert torch.equal(hs[-1], base.norm(_pre_norm(engine, samples)))
    for b, (s, c) in enumerate(zip(samples, got, strict=True)):
        t = len(s.input_ids)
        assert c.input_ids == s.input_ids and c.loss_mask == s.loss_mask
        assert len(c.aux) == len(engine.aux_layers)
        for layer, aux in zip(engine.aux_layers, c.aux, strict=True):
            assert aux.shape == (t, engine.hidden_size)
            assert torch.equal(aux, hs[layer + 1][b, :t])  # exact in fp32
        assert torch.equal(c.last, hs[-1][b, :t])


def _pre_norm(engine: HFEngine, samples: list[Tokenized]) -> torch.Tensor:
    """Output of the last decoder layer (before the final norm), via a hook."""
    from specctl.target.capture import HiddenCapture

    ids, mask = pad_batch([s.input_ids for s in samples], engine.pad_id, left=False)
    with torch.inference_mode(), HiddenCapture(engine.model, [engine.num_layers - 1]) as cap:
        cap.base(input_ids=ids, attention_mask=mask, use_cache=False)
    return cap.aux[0]


def test_tiny_hooks_equal_output_hidden_states(tiny: HFEngine) -> None:
    assert tiny.aux_layers == [1, 3, 4]  # N=8: 1, N/2-1, N-4
    _check_exact(tiny, _samples(tiny, CONVERSATIONS))  # 3 lengths in one right-padded batch


def test_tiny_custom_layers_and_batching_by_budget(tmp_path) -> None:
    eng = HFEngine(
        build_tiny_target(tmp_path, num_layers=8),
        device="cpu",
        aux_layers=[6, 0, 7],
        token_budget=60,
    )
    assert eng.aux_layers == [0, 6, 7]
    samples = _samples(eng, CONVERSATIONS)
    got = eng.capture(samples)  # budget 60 forces one sample per batch
    assert [c.input_ids for c in got] == [s.input_ids for s in samples]
    norm = eng.model.get_decoder().norm
    for s, c in zip(samples, got, strict=True):
        ref = _reference(eng, [s])
        assert torch.equal(c.aux[0], ref[1][0]) and torch.equal(c.aux[1], ref[7][0])
        # HF's hidden_states[N] is post-norm, so layer N-1's output is only reachable by a hook
        assert not torch.equal(c.aux[2], ref[8][0])
        with torch.inference_mode():
            assert torch.equal(norm(c.aux[2]), c.last)
        assert torch.equal(c.last, ref[-1][0])


def test_padding_does_not_change_states(tiny: HFEngine) -> None:
    samples = _samples(tiny, CONVERSATIONS)
    together = tiny.capture(samples)
    alone = [tiny.capture([s])[0] for s in samples]
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(a.last, b.last, rtol=1e-5, atol=1e-5)
        for x, y in zip(a.aux, b.aux, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_aux_layer_validation() -> None:
    assert default_aux_layers(30) == [1, 14, 26]
    assert check_aux_layers([26, 1, 14], 30) == [1, 14, 26]
    with pytest.raises(InputError, match="out of range"):
        check_aux_layers([1, 30], 30)
    with pytest.raises(InputError, match="out of range"):
        check_aux_layers([-1], 30)
    with pytest.raises(InputError, match="repeat"):
        check_aux_layers([2, 2], 30)


def test_token_batches_respect_budget() -> None:
    lens = [5, 50, 20, 20, 7, 100]
    batches = token_batches(lens, 60)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lens[i] for i in b) <= 60


def test_smollm2_hooks_equal_output_hidden_states() -> None:
    from specctl.target.models import resolve_model

    eng = HFEngine(resolve_model("smollm2-135m"), device="cpu")
    assert eng.num_layers == 30 and eng.aux_layers == [1, 14, 26] and eng.hidden_size == 576
    _check_exact(eng, _samples(eng, CONVERSATIONS[:2]))
