"""The target writes its own training text: regenerated answers and self-prompts.

Regeneration (`--regenerate`) drops a conversation's assistant turns and lets the target
answer each user turn in order, so the draft learns the target's own distribution (the largest
single lever on acceptance). Self-prompts (`--self-prompts N`, Magpie-style) sample a user turn
right after the template's user header, then regenerate its answer.

Determinism: every sample draws from its own seed, `sample_seed(seed, epoch, index)`, and the
r-th generation round of a sample from `sample_seed(that, r)`, so a record depends on its id
and seed, not on which producer made it or which samples shared its batch (up to float
rounding of the batch shape; greedy decoding and token ids of fixed data are exact).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from specctl.target.engines import Engine, SamplingParams
from specctl.target.template import Message, encode_text, render, user_header

SELF_PROMPT_PARAMS = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=96)


def sample_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class Job:
    """One conversation being (re)written: its messages so far and its base seed."""

    messages: list[Message]
    seed: int


def regenerate(engine: Engine, jobs: list[Job], params: SamplingParams) -> None:
    """Replace assistant turns with the target's own answers, round by round, in place."""
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
        answers = engine.generate(prompts, params, seeds)
        for i, ans in zip(active, answers, strict=True):
            jobs[i].messages.append({"role": "assistant", "content": _decode(engine, ans)})
        round_ += 1


def self_prompts(engine: Engine, seeds: list[int]) -> list[list[Message]]:
    """One user turn per seed, sampled after the user header (answers come from regenerate)."""
    header = encode_text(engine.tokenizer, user_header(engine.tokenizer))
    texts = engine.generate(
        [header] * len(seeds), SELF_PROMPT_PARAMS, [sample_seed(s, -1) for s in seeds]
    )
    return [[{"role": "user", "content": _decode(engine, t) or "Hello!"}] for t in texts]


def _decode(engine: Engine, ids: list[int]) -> str:
    ids = [t for t in ids if t not in engine.stop_ids]
    return str(engine.tokenizer.decode(ids, skip_special_tokens=True)).strip()
