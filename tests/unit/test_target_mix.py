"""Weighted prompt mixing, topic self-prompt selection and dedup (no model needed)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from specctl.errors import UsageError
from specctl.store.address import bind_listener
from specctl.store.control import Control
from specctl.target.data import Prompt
from specctl.target.dedup import Dedup, sample_hash
from specctl.target.generate import sample_seed
from specctl.target.mix import PromptSpace, Source, parse_specs, permute
from specctl.target.template import Tokenized
from specctl.target.topics import TOPICS, degenerate, topic_of

pytestmark = pytest.mark.unit


def _items(tag: str, n: int) -> list[Prompt]:
    return [Prompt(text=f"{tag}{i}") for i in range(n)]


def _space(weights: tuple[float | None, float | None, float | None]) -> PromptSpace:
    """a: 100 prompts, self, f: 10 prompts."""
    return PromptSpace(
        [
            Source("a", weights[0], _items("a", 100)),
            Source("self", weights[1]),
            Source("f", weights[2], _items("f", 10)),
        ],
        self_count=20,
    )


def _key(space: PromptSpace, seed: int, seq: int) -> tuple[str, str | None]:
    p = space.pick(seed, *divmod(seq, space.size))
    return p.source, None if p.prompt is None else p.prompt.text


def test_parse_specs() -> None:
    assert parse_specs("chatterbot:3,self:2,/d/x:y.jsonl:0.5,plain,none") == [
        ("chatterbot", 3.0),
        ("self", 2.0),
        ("/d/x:y.jsonl", 0.5),  # a colon in a path is not a weight
        ("plain", None),
    ]
    assert parse_specs(["chatterbot:1", "self"]) == [("chatterbot", 1.0), ("self", None)]
    for bad in ("chatterbot:0", "chatterbot:-1", "a:1,a:2", "a,,b"):
        with pytest.raises(UsageError):
            parse_specs(bad)


def test_permute_is_a_bijection() -> None:
    for n in (1, 2, 3, 7, 100, 1000):
        assert sorted(permute(i, n, ("k", n)) for i in range(n)) == list(range(n))
    assert [permute(i, 100, 1) for i in range(100)] != [permute(i, 100, 2) for i in range(100)]


def test_weighted_mix_is_deterministic_and_respects_weights() -> None:
    space = _space((3, 2, 1))
    # the epoch covers `a` (largest size/weight) once: 100 * 6/3 = 200 slots, exact shares
    assert space.size == 200 and [s.slots for s in space.sources] == [100, 67, 33]
    order = [_key(space, 7, s) for s in range(1000)]
    assert order == [_key(_space((3, 2, 1)), 7, s) for s in range(1000)]  # same seed, same order
    assert order != [_key(space, 8, s) for s in range(1000)]  # the seed matters
    counts = Counter(src for src, _ in order)
    for name, share in (("a", 3 / 6), ("self", 2 / 6), ("f", 1 / 6)):
        assert abs(counts[name] / 1000 - share) < 0.02, counts
    # any prefix is mixed, not one source after another
    first = Counter(src for src, _ in order[:60])
    assert all(first[n] >= 4 for n in ("a", "self", "f")), first


def test_items_are_disjoint_across_ids() -> None:
    space = _space((3, 2, 1))
    f: Counter[str | None] = Counter()
    for epoch in range(10):
        picks = [space.pick(0, epoch, i) for i in range(space.size)]
        a = [p.prompt.text for p in picks if p.source == "a" and p.prompt]
        assert sorted(a) == sorted(f"a{i}" for i in range(100))  # each exactly once an epoch
        f.update(p.prompt.text for p in picks if p.source == "f" and p.prompt)
    # `f` is upsampled: 33 slots an epoch walk shuffled cycles of its 10 items
    assert f == Counter({f"f{i}": 33 for i in range(10)})
    # a source's items are reshuffled each epoch
    e0 = [space.pick(0, 0, i).prompt for i in range(space.size)]
    e1 = [space.pick(0, 1, i).prompt for i in range(space.size)]
    assert e0 != e1


def test_concat_mode_keeps_the_legacy_layout() -> None:
    prompts = _items("p", 5)
    space = PromptSpace.from_prompts(prompts, self_prompts=3)
    assert space.size == 8 and not space.weighted
    picks = [space.pick(0, 1, i) for i in range(8)]
    assert [p.prompt for p in picks[:5]] == prompts
    assert [p.source for p in picks[5:]] == ["self"] * 3 and picks[5].prompt is None
    with pytest.raises(UsageError, match="self-prompts"):
        PromptSpace([Source("self", None)], self_count=0)
    with pytest.raises(UsageError, match="no prompts"):
        PromptSpace([], self_count=0)


def test_topic_is_per_sample_and_covers_all_topics() -> None:
    seeds = [sample_seed(3, e, i) for e in range(2) for i in range(500)]
    topics = [topic_of(s)[0] for s in seeds]
    assert topics == [topic_of(s)[0] for s in seeds]
    counts = Counter(topics)
    assert set(counts) == {t for t, _ in TOPICS}
    expect = len(seeds) / len(TOPICS)
    assert all(abs(c - expect) < 0.35 * expect for c in counts.values()), counts


def test_degenerate_prompts() -> None:
    for bad in ("", "   ", "Hi", "ok ok", "what what what what what what what what what",
                "a\nb\na\nb\na\nb", "Help!!!!!!!!!!!! me now please"):  # fmt: skip
        assert degenerate(bad), bad
    for good in (
        "How do I reverse a linked list in Python?",
        "Write a haiku about the sea at night.",
    ):
        assert not degenerate(good), good


@pytest.fixture
def ctl() -> Iterator[Control]:
    listener = bind_listener("127.0.0.1", 0)
    port = listener.getsockname()[1]
    host = Control.host(listener)
    yield Control.connect("127.0.0.1", port, 5.0)
    del host


def test_dedup_local_and_store_wide(ctl: Control) -> None:
    a, b = Tokenized([1, 2, 3], [0, 1, 1]), Tokenized([1, 2, 4], [0, 1, 1])
    assert sample_hash(a) != sample_hash(Tokenized([1, 2, 3], [0, 0, 1]))  # the mask counts
    local = Dedup()
    assert local.keep(a, 0, 0) and local.keep(b, 0, 1)
    assert not local.keep(Tokenized([1, 2, 3], [0, 1, 1]), 0, 2)
    assert local.keep(a, 0, 0)  # the same sample id again (a re-issued lease) is not a repeat
    assert local.dropped == 1
    # two producers on one store: the first claim of a hash wins for both
    p1, p2 = Dedup(ctl.claim), Dedup(ctl.claim)
    assert p1.keep(a, 1, 5)
    assert not p2.keep(a, 2, 7) and p2.dropped == 1
    assert p2.keep(a, 1, 5)  # p2 re-making p1's sample (lease re-issued) keeps it
    assert p2.keep(b, 2, 8) and not p1.keep(b, 3, 0)


def test_dedup_policy() -> None:
    from specctl.target.mix import Pick
    from specctl.target.producer import ServeTargetConfig
    from specctl.target.samples import deduplicated

    chat, text, selfp = (
        Pick("a", Prompt(messages=[{"role": "user", "content": "hi"}])),
        Pick("f", Prompt(text="t")),
        Pick("self", None),
    )

    def policy(**kw: object) -> list[bool]:
        cfg = ServeTargetConfig(**kw)  # type: ignore[arg-type]
        return [deduplicated(p, cfg) for p in (chat, text, selfp)]

    assert policy() == [False, False, True]  # fixed data: repeats are the user's choice
    assert policy(regenerate=True) == [False, False, True]  # greedy answers too
    assert policy(regenerate=True, temperature=0.7) == [True, False, True]
    assert policy(regenerate=True, dedup="on") == [True, False, True]
    assert policy(regenerate=True, temperature=0.7, dedup="off") == [False, False, False]
