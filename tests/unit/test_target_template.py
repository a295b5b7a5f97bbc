"""Chat template + assistant-only loss masks: exact goldens for ChatML (SmolLM2) and Llama-3 style."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specctl.errors import InputError
from specctl.target.template import tokenize_conversation, tokenize_text, user_header
from tests.goldens.tiny_target import CONVERSATIONS, build_tokenizer

pytestmark = pytest.mark.unit
GOLDENS = Path(__file__).resolve().parents[1] / "goldens"


@pytest.fixture(scope="module")
def llama3_tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def smol_tok():
    from specctl.target.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2-135m"))


def _masked_text(tok, ids, mask) -> str:
    return tok.decode([i for i, m in zip(ids, mask, strict=True) if m])


@pytest.mark.parametrize(
    "name,fixture,eot",
    [
        ("template_llama3_style.json", "llama3_tok", "<|eot_id|>"),
        ("template_smollm2_chatml.json", "smol_tok", "<|im_end|>"),
    ],
)
def test_golden_ids_and_masks(name, fixture, eot, request) -> None:
    tok = request.getfixturevalue(fixture)
    gold = json.loads((GOLDENS / name).read_text())
    assert [g["messages"] for g in gold] == CONVERSATIONS
    for g in gold:
        got = tokenize_conversation(tok, g["messages"])
        assert got.input_ids == g["input_ids"]
        assert got.loss_mask == g["loss_mask"]
        # independent of the goldens: ids equal the tokenizer's own templated tokenisation ...
        ref = tok.apply_chat_template(g["messages"], tokenize=True, return_dict=True)
        assert got.input_ids == list(ref["input_ids"])
        # ... and the masked tokens are exactly each assistant turn plus its end-of-turn token
        answers = [m["content"] for m in g["messages"] if m["role"] == "assistant"]
        expect = "".join(a.strip() + eot if "llama3" in name else a + eot for a in answers)
        assert _masked_text(tok, got.input_ids, got.loss_mask) == expect


def test_generation_tags_path_agrees_with_prefix_diff(smol_tok) -> None:
    """A ChatML template with {% generation %} tags gives the same mask via HF's own path."""
    import copy

    tagged = copy.deepcopy(smol_tok)
    tagged.chat_template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n' }}{% endif %}"
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    for conv in CONVERSATIONS:
        assert tokenize_conversation(tagged, conv) == tokenize_conversation(smol_tok, conv)


def test_prefix_unstable_template_is_refused(llama3_tok) -> None:
    import copy

    tok = copy.deepcopy(llama3_tok)  # drops all but the last assistant turn: not prefix-stable
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>' + m['content'] + '<|eot_id|>' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>' }}{% endif %}"
    )
    with pytest.raises(InputError, match="prefix-stable"):
        tokenize_conversation(tok, CONVERSATIONS[1])


def test_plain_text_trains_every_token_and_user_header(llama3_tok, smol_tok) -> None:
    t = tokenize_text(llama3_tok, "abc")
    assert t.loss_mask == [1, 1, 1] and llama3_tok.decode(t.input_ids) == "abc"
    assert (
        user_header(llama3_tok) == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    )
    assert user_header(smol_tok).endswith("<|im_end|>\n<|im_start|>user\n")
