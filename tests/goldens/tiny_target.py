"""A tiny local target for tests: a Llama-3-style chat tokenizer and a random LlamaForCausalLM.

Nothing comes from a hub. The tokenizer is byte-level BPE with no merges (one token per
byte, ids fixed by the sorted byte alphabet) plus Llama-3's special tokens, with a small
Llama-3-style chat template; so its goldens are exact and stable across library versions.

`python tests/goldens/tiny_target.py` rewrites the template goldens next to this file (review
the diff: the goldens are the spec).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

CONVERSATIONS: list[list[dict[str, str]]] = [
    [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, of course.\n"},
    ],
    [{"role": "user", "content": "Only a question, no answer"}],
]


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
    )
    fast.chat_template = LLAMA3_TEMPLATE
    return fast


def build_tiny_target(folder: Path, num_layers: int = 8, seed: int = 0) -> Path:
    """Save a random Llama (H=64) + the tiny tokenizer as a normal local HF checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def golden(tokenizer: Any) -> list[dict[str, Any]]:
    from specctl.target.template import tokenize_conversation

    out = []
    for conv in CONVERSATIONS:
        t = tokenize_conversation(tokenizer, conv)
        out.append({"messages": conv, "input_ids": t.input_ids, "loss_mask": t.loss_mask})
    return out


def write_goldens() -> None:
    from specctl.target.models import load_tokenizer, resolve_model

    (HERE / "template_llama3_style.json").write_text(json.dumps(golden(build_tokenizer())) + "\n")
    smol = load_tokenizer(resolve_model("smollm2-135m"))
    (HERE / "template_smollm2_chatml.json").write_text(json.dumps(golden(smol)) + "\n")


if __name__ == "__main__":
    sys.exit(write_goldens())


def one_torch_thread():
    """Generator for an autouse fixture: tiny models run faster on one thread, and on a shared
    2-core box spinning OpenMP threads of several processes slow each forward ~10x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
