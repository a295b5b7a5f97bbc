"""Batched seeded generation, regeneration and self-prompts on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from specctl.target.engines import SamplingParams
from specctl.target.engines.hf import HFEngine, sample_token
from specctl.target.generate import Job, regenerate, sample_seed, self_prompts
from specctl.target.template import encode_text, render
from tests.goldens.tiny_target import CONVERSATIONS, build_tiny_target, one_torch_thread

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)
pytestmark = pytest.mark.unit
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> HFEngine:
    return HFEngine(build_tiny_target(tmp_path_factory.mktemp("tiny")), device="cpu")


def _prompts(eng: HFEngine) -> list[list[int]]:
    return [
        encode_text(eng.tokenizer, render(eng.tokenizer, c[:1], add_generation_prompt=True))
        for c in CONVERSATIONS
    ]


def _reference_greedy(eng: HFEngine, prompt: list[int], n: int) -> list[int]:
    """Plain recompute-everything greedy decoding: no cache, no padding."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            nxt = int(eng.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt in eng.stop_ids:
                break
    return ids[len(prompt) :]


def test_left_padded_cached_greedy_matches_reference(tiny: HFEngine) -> None:
    prompts = _prompts(tiny)
    assert len({len(p) for p in prompts}) > 1  # really padded
    got = tiny.generate(prompts, GREEDY, seeds=[0, 1, 2])
    for p, g in zip(prompts, got, strict=True):
        assert g == _reference_greedy(tiny, p, GREEDY.max_new_tokens)


def test_sampling_depends_on_own_seed_only(tiny: HFEngine) -> None:
    prompts = _prompts(tiny)
    together = tiny.generate(prompts, SAMPLED, seeds=[11, 22, 33])
    alone = [
        tiny.generate([p], SAMPLED, seeds=[s])[0]
        for p, s in zip(prompts, [11, 22, 33], strict=True)
    ]
    assert together == alone
    assert tiny.generate(prompts[:1], SAMPLED, seeds=[12]) != together[:1]  # the seed matters


def test_sample_token_top_p() -> None:
    logits = torch.tensor([5.0, 4.9, -10.0, -10.0])
    g = torch.Generator().manual_seed(0)
    draws = {sample_token(logits, SamplingParams(1.0, 0.5, 1), g) for _ in range(50)}
    assert draws == {0}  # top-p 0.5 keeps only the top token
    draws = {sample_token(logits, SamplingParams(1.0, 0.99, 1), g) for _ in range(200)}
    assert draws == {0, 1}
    assert sample_token(logits, SamplingParams(0.0, 1.0, 1), g) == 0


def test_regenerate_rewrites_assistant_turns(tiny: HFEngine) -> None:
    jobs = [Job([dict(m) for m in c], seed=7) for c in CONVERSATIONS]
    regenerate(tiny, jobs, GREEDY)
    for job, conv in zip(jobs, CONVERSATIONS, strict=True):
        users = [m for m in conv if m["role"] == "user"]
        assert [m for m in job.messages if m["role"] == "user"] == users
        assert [m["role"] for m in job.messages if m["role"] != "system"] == [
            "user",
            "assistant",
        ] * len(users)
        assert [m for m in job.messages if m["role"] == "system"] == [
            m for m in conv if m["role"] == "system"
        ]
    again = [Job([dict(m) for m in c], seed=7) for c in CONVERSATIONS]
    regenerate(tiny, again, GREEDY)
    assert [j.messages for j in again] == [j.messages for j in jobs]


def test_self_prompts_are_seeded(tiny: HFEngine) -> None:
    a = self_prompts(tiny, [1, 2, 3])
    assert a == self_prompts(tiny, [1, 2, 3])
    assert all(len(c) == 1 and c[0]["role"] == "user" and c[0]["content"] for c in a)
    assert len({c[0]["content"] for c in a}) == 3


def test_sample_seed_is_stable() -> None:
    assert sample_seed(0, 0, 1) == sample_seed(0, 0, 1) != sample_seed(0, 1, 0)
    # blake2b of "1:2:3", not Python's per-process salted hash(): same in every producer
    assert sample_seed(1, 2, 3) == 8384462955522581546


def test_samples_depend_on_id_not_on_lease(tiny: HFEngine) -> None:
    """Regenerated + self-prompted samples are the same whether leased together or apart."""
    from specctl.target.data import Prompt
    from specctl.target.producer import ServeTargetConfig
    from specctl.target.samples import build_samples

    prompts = [Prompt(messages=c) for c in CONVERSATIONS]  # indices 3, 4: self-prompts
    cfg = ServeTargetConfig(regenerate=True, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=5)
    ids = [(0, 0), (1, 2), (0, 3), (0, 4)]
    together = build_samples(tiny, prompts, ids, cfg)
    apart = [build_samples(tiny, prompts, [i], cfg)[0] for i in ids]
    assert together == apart
    assert together[0] != build_samples(tiny, prompts, [(1, 0)], cfg)[0]  # epoch is in the seed
    assert all(1 in t.loss_mask for t in together)
