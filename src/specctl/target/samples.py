"""Sample ids -> tokenised samples: the data a record is a deterministic function of.

Index i < len(prompts) names a dataset prompt; larger indices are self-prompts (the target
writes the user turn). Conversations are regenerated when asked (self-prompts always are),
rendered with the chat template and masked to assistant tokens; plain text and pre-tokenised
rows are used as they are. Every sample is cut to `max_tokens`.
"""

from __future__ import annotations

from typing import Any

from specctl.target.data import Prompt
from specctl.target.engines import Engine, SamplingParams
from specctl.target.generate import Job, regenerate, sample_seed, self_prompts
from specctl.target.template import Tokenized, tokenize_conversation, tokenize_text


def build_samples(
    engine: Engine, prompts: list[Prompt], ids: list[tuple[int, int]], cfg: Any
) -> list[Tokenized]:
    seeds = [sample_seed(cfg.seed, epoch, index) for epoch, index in ids]
    # 1. self-prompts: the target writes the user turn
    selfs = [k for k, (_e, index) in enumerate(ids) if index >= len(prompts)]
    written = self_prompts(engine, [seeds[k] for k in selfs]) if selfs else []
    convs: dict[int, list] = dict(zip(selfs, written, strict=True))
    for k, (_e, index) in enumerate(ids):
        if k not in convs and prompts[index].messages is not None:
            convs[k] = [dict(m) for m in prompts[index].messages or []]
    # 2. regeneration: the target answers every user turn (all conversations of the lease at once)
    redo = [k for k in convs if cfg.regenerate or k in selfs]
    if redo:
        jobs = [Job(convs[k], seeds[k]) for k in redo]
        regenerate(engine, jobs, SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens))
        for k, job in zip(redo, jobs, strict=True):
            convs[k] = job.messages
    # 3. template + mask (or the row as given), then truncate
    out = []
    for k, (_e, index) in enumerate(ids):
        if k in convs:
            t = tokenize_conversation(engine.tokenizer, convs[k])
        elif prompts[index].text is not None:
            t = tokenize_text(engine.tokenizer, prompts[index].text or "")
        else:
            t = prompts[index].tokens or Tokenized([], [])
        out.append(Tokenized(t.input_ids[: cfg.max_tokens], t.loss_mask[: cfg.max_tokens]))
    return out
