"""The target writes its own training text: regenerated answers and self-prompts.

Regeneration (`--regenerate`) drops a conversation's assistant turns and lets the target
answer each user turn in order (multi-turn sources: turn r+1 is asked after the target's own
answer to turn r), so the draft learns the target's own distribution (the largest single
lever on acceptance). Self-prompts (`self` source, Magpie-style) sample a user turn right
after the template's user header, steered by a per-sample topic (`topics`); degenerate ones
are resampled (3 tries, then a fixed prompt of that topic), then the answer is regenerated.
With temperature > 0 every epoch of a sample differs (its seed holds the epoch), so a
producer running many epochs keeps feeding a trainer fresh samples.

Determinism: every sample draws from its own seed, `sample_seed(seed, epoch, index)`, and the
r-th generation round of a sample from `sample_seed(that, r)`, so a record depends on its id
and seed, not on which producer made it or which samples shared its batch (up to float
rounding of the batch shape; greedy decoding and token ids of fixed data are exact).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from specctl.target.engines import Engine, SamplingParams
from specctl.target.template import Message, encode_text, render, user_header
from specctl.target.topics import FALLBACK, degenerate, steering, topic_of

SELF_PROMPT_PARAMS = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=96)
SELF_PROMPT_TRIES = 3


@dataclass
class GenStats:
    """What generation cost: tokens the target wrote (pads excluded) and the time it took."""

    tokens: int = 0
    seconds: float = 0.0
    rejected: int = 0  # degenerate self-prompts resampled
    fallbacks: int = 0  # self-prompts that fell back to a fixed prompt of their topic

    def generate(
        self, engine: Engine, prompts: list[list[int]], params: SamplingParams, seeds: list[int]
    ) -> list[list[int]]:
        t0 = time.perf_counter()
        out = engine.generate(prompts, params, seeds)
        self.seconds += time.perf_counter() - t0
        self.tokens += sum(len(o) for o in out)
        return out


def sample_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class Job:
    """One conversation being (re)written: its messages so far and its base seed."""

    messages: list[Message]
    seed: int


def regenerate(
    engine: Engine, jobs: list[Job], params: SamplingParams, stats: GenStats | None = None
) -> None:
    """Replace assistant turns with the target's own answers, round by round, in place."""
    stats = stats if stats is not None else GenStats()
    # 1. keep system + user turns; pending[j] = user turns still to answer
    pending = [[m for m in j.messages if m["role"] == "user"] for j in jobs]
    for j in jobs:
        j.messages = [m for m in j.messages if m["role"] == "system"]
    round_ = 0
    while any(pending):
        # 2. this round: every job with a user turn left asks it and gets one answer
        active = [i for i, p in enumerate(pending) if p]
        for i in active:
            jobs[i].messages.append(pending[i].pop(0))
        prompts = [
            encode_text(
                engine.tokenizer,
                render(engine.tokenizer, jobs[i].messages, add_generation_prompt=True),
            )
            for i in active
        ]
        seeds = [sample_seed(jobs[i].seed, round_) for i in active]
        answers = stats.generate(engine, prompts, params, seeds)
        for i, ans in zip(active, answers, strict=True):
            jobs[i].messages.append({"role": "assistant", "content": _decode(engine, ans)})
        round_ += 1


def self_prompts(
    engine: Engine, seeds: list[int], stats: GenStats | None = None
) -> list[list[Message]]:
    """One user turn per seed on the seed's topic (answers come from regenerate)."""
    stats = stats if stats is not None else GenStats()
    # 1. the topic of each sample picks its steered header
    topics = [topic_of(s) for s in seeds]
    headers = {
        t: encode_text(engine.tokenizer, user_header(engine.tokenizer, steering(desc)))
        for t, desc in set(topics)
    }
    texts: list[str | None] = [None] * len(seeds)
    # 2. sample, keep the good ones, resample the degenerate ones with the next try's seed
    for attempt in range(SELF_PROMPT_TRIES):
        todo = [k for k, t in enumerate(texts) if t is None]
        if not todo:
            break
        got = stats.generate(
            engine,
            [headers[topics[k][0]] for k in todo],
            SELF_PROMPT_PARAMS,
            [sample_seed(seeds[k], -1, *([attempt] if attempt else [])) for k in todo],
        )
        for k, ids in zip(todo, got, strict=True):
            text = _decode(engine, ids)
            if degenerate(text):
                stats.rejected += 1
            else:
                texts[k] = text
    # 3. still degenerate after every try: a fixed prompt of the topic
    out = []
    for k, written in enumerate(texts):
        if written is None:
            stats.fallbacks += 1
        out.append([{"role": "user", "content": written or FALLBACK[topics[k][0]]}])
    return out


def _decode(engine: Engine, ids: list[int]) -> str:
    ids = [t for t in ids if t not in engine.stop_ids]
    return str(engine.tokenizer.decode(ids, skip_special_tokens=True)).strip()
