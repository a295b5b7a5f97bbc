"""Chat template -> token ids + an assistant-only loss mask.

The template is the tokenizer's own (`apply_chat_template`), so any local checkpoint works.
Two ways to find the assistant tokens:
1. templates with `{% generation %}` tags: `return_assistant_tokens_mask=True` (HF computes it);
2. all others (ChatML, Llama-3 style, ...): render the conversation once to text, and for each
   assistant turn i take the character span between the rendering of turns [:i] with the
   generation prompt and the rendering of turns [:i+1]; tokenise the full text once with
   offsets and mark tokens that start inside a span. The span covers the content and the
   end-of-turn token (the draft must learn to stop) but not whitespace after it (ChatML's
   trailing newline), matching what generation-tag templates mark.
Tokenising the full text once (not the pieces) keeps the ids identical to
`apply_chat_template(tokenize=True)`; a test checks that.

Trap: method 2 needs each shorter rendering to be a text prefix of the longer one. Templates
that rewrite earlier turns (e.g. drop reasoning from past assistant turns) break that; we
raise an InputError rather than emit a wrong mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specctl.errors import InputError

Message = dict[str, str]


@dataclass
class Tokenized:
    """One training sample before capture: ids and the assistant-token mask, both length T."""

    input_ids: list[int]
    loss_mask: list[int]


def has_generation_tags(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return "{% generation %}" in template or "{%- generation %}" in template


def render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Rendered text -> ids; the template already holds any BOS, so add no special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_conversation(tokenizer: Any, messages: list[Message]) -> Tokenized:
    """Ids of the rendered conversation and a mask of 1 on assistant tokens only."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError("the tokenizer has no chat template", "use a chat model or `text` data")
    if has_generation_tags(tokenizer):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return Tokenized(list(out["input_ids"]), [int(m) for m in out["assistant_masks"]])
    return _mask_by_prefix_diff(tokenizer, messages)


def _mask_by_prefix_diff(tokenizer: Any, messages: list[Message]) -> Tokenized:
    full = render(tokenizer, messages)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        upto = render(tokenizer, messages[: i + 1])
        if not full.startswith(upto) or not upto.startswith(full[:start]):
            raise InputError(
                "the chat template is not prefix-stable; cannot derive the assistant mask",
                "add {% generation %} tags to the template",
            )
        end = len(upto.rstrip())
        spans.append((start, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [0] * len(ids)
    for t, (a, _b) in enumerate(enc["offset_mapping"]):
        if any(s <= a < e for s, e in spans):
            mask[t] = 1
    return Tokenized(ids, mask)


def tokenize_text(tokenizer: Any, text: str) -> Tokenized:
    """Plain text (no template): every token is a training target."""
    ids = encode_text(tokenizer, text)
    return Tokenized(ids, [1] * len(ids))


def user_header(tokenizer: Any, system: str | None = None) -> str:
    """Text that opens a user turn at the start of a conversation (for self-prompts)."""
    sentinel = "\x00SPECCTL\x00"
    first = [{"role": "system", "content": system}] if system else []
    text = render(tokenizer, [*first, {"role": "user", "content": sentinel}])
    return text[: text.index(sentinel)]
