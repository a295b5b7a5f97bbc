"""Sample ids -> tokenised samples: the data a record is a deterministic function of.

The prompt space (`mix.PromptSpace`) names each index's source and prompt; a `self` slot is
a self-prompt (the target writes the user turn). Conversations are regenerated when asked
(self-prompts always are), rendered with the chat template and masked to assistant tokens;
plain text and pre-tokenised rows are used as they are. Every sample is cut to `max_tokens`.
"""

from __future__ import annotations

from typing import Any

from specctl.target.data import Prompt
from specctl.target.engines import Engine, SamplingParams
from specctl.target.generate import GenStats, Job, regenerate, sample_seed, self_prompts
from specctl.target.mix import Pick, PromptSpace
from specctl.target.template import Tokenized, tokenize_conversation, tokenize_text


def build_samples(
    engine: Engine,
    space: PromptSpace | list[Prompt],
    ids: list[tuple[int, int]],
    cfg: Any,
    stats: GenStats | None = None,
) -> list[Tokenized]:
    """`space` may be a plain prompt list (indices past its end are self-prompts)."""
    if not isinstance(space, PromptSpace):
        space = PromptSpace.from_prompts(
            space, max((i for _e, i in ids), default=-1) + 1 - len(space)
        )
    stats = stats if stats is not None else GenStats()
    seeds = [sample_seed(cfg.seed, epoch, index) for epoch, index in ids]
    picks = [space.pick(cfg.seed, epoch, index).prompt for epoch, index in ids]
    # 1. self-prompts: the target writes the user turn
    selfs = [k for k, p in enumerate(picks) if p is None]
    written = self_prompts(engine, [seeds[k] for k in selfs], stats) if selfs else []
    convs: dict[int, list] = dict(zip(selfs, written, strict=True))
    for k, p in enumerate(picks):
        if p is not None and p.messages is not None:
            convs[k] = [dict(m) for m in p.messages]
    # 2. regeneration: the target answers every user turn (all conversations of the lease at once)
    redo = [k for k in convs if cfg.regenerate or k in selfs]  # = is_generated
    if redo:
        jobs = [Job(convs[k], seeds[k]) for k in redo]
        params = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens)
        regenerate(engine, jobs, params, stats)
        for k, job in zip(redo, jobs, strict=True):
            convs[k] = job.messages
    # 3. template + mask (or the row as given), then truncate
    out = []
    for k, p in enumerate(picks):
        if k in convs:
            t = tokenize_conversation(engine.tokenizer, convs[k])
        elif p is not None and p.text is not None:
            t = tokenize_text(engine.tokenizer, p.text)
        else:
            t = (p.tokens if p is not None else None) or Tokenized([], [])
        out.append(Tokenized(t.input_ids[: cfg.max_tokens], t.loss_mask[: cfg.max_tokens]))
    return out


def deduplicated(pick: Pick, cfg: Any) -> bool:
    """Whether this sample is checked for repeats (`dedup`: auto | on | off).

    Fixed data repeated by epochs, weights or repeated rows is the user's choice, and so is
    greedy regeneration of a repeated prompt (a function of the prompt, like fixed data):
    `auto` checks what sampling wrote (self-prompts; regeneration at temperature > 0),
    `on` every sample the target wrote, `off` nothing.
    """
    written = pick.prompt is None or (cfg.regenerate and pick.prompt.messages is not None)
    if cfg.dedup == "on":
        return written
    return cfg.dedup == "auto" and (pick.prompt is None or (written and cfg.temperature > 0))
