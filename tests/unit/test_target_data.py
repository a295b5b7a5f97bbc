"""Prompt formats, files through `datasets`, built-in sources, unusable data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specctl.errors import InputError
from specctl.target.data import load_prompts, row_to_prompt

pytestmark = pytest.mark.unit

ROWS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    {"turns": ["first question", "second question"]},
    {"text": "plain text row"},
    {"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]},
]


def test_row_formats() -> None:
    p = [row_to_prompt(r) for r in ROWS]
    assert p[0].messages == ROWS[0]["messages"]
    assert p[1].messages == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    assert p[2].messages == [
        {"role": "user", "content": "first question"},
        {"role": "user", "content": "second question"},
    ]
    assert p[3].text == "plain text row"
    assert p[4].tokens.input_ids == [5, 6, 7] and p[4].tokens.loss_mask == [0, 1, 1]
    parts = row_to_prompt(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ]
        }
    )
    assert parts.messages[0]["content"] == "ab"
    with pytest.raises(InputError, match="differ in length"):
        row_to_prompt({"input_ids": [1, 2], "loss_mask": [1]})


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_files_through_datasets(tmp_path: Path) -> None:
    import datasets

    # one format per file: datasets unifies a file's columns into one schema
    chat = _write_jsonl(tmp_path / "chat.jsonl", [ROWS[0], ROWS[0]])
    assert [p.messages for p in load_prompts(str(chat))] == [ROWS[0]["messages"]] * 2
    (tmp_path / "share.json").write_text(json.dumps([ROWS[1]]))
    assert load_prompts(str(tmp_path / "share.json"))[0].messages[1]["role"] == "assistant"
    datasets.Dataset.from_list([ROWS[4]]).to_parquet(str(tmp_path / "tok.parquet"))
    assert load_prompts(str(tmp_path / "tok.parquet"))[0].tokens.input_ids == [5, 6, 7]
    datasets.DatasetDict({"train": datasets.Dataset.from_list([ROWS[3]])}).save_to_disk(
        str(tmp_path / "saved")
    )
    assert load_prompts(str(tmp_path / "saved"))[0].text == "plain text row"


def test_user_only_rows_need_regenerate(tmp_path: Path) -> None:
    f = _write_jsonl(tmp_path / "q.jsonl", [ROWS[2]])
    with pytest.raises(InputError, match="no usable turns"):
        load_prompts(str(f))
    assert len(load_prompts(str(f), regenerate=True)) == 1


def test_unusable_and_missing(tmp_path: Path) -> None:
    f = _write_jsonl(
        tmp_path / "empty.jsonl", [{"messages": [{"role": "user", "content": " "}]}, {"text": ""}]
    )
    with pytest.raises(InputError, match="no usable turns"):
        load_prompts(str(f), regenerate=True)
    with pytest.raises(InputError, match="not found"):
        load_prompts(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a\n1\n")
    with pytest.raises(InputError, match="unsupported"):
        load_prompts(str(tmp_path / "x.csv"))


def test_builtin_sources() -> None:
    chat = load_prompts("chatterbot")
    assert len(chat) == 2026  # English chatterbot-corpus conversations, all with an answer
    assert [m["role"] for m in chat[0].messages][:2] == ["user", "assistant"]
    with pytest.raises(InputError, match="no usable turns"):
        load_prompts("mtbench")  # questions only: answers need --regenerate
    mt = load_prompts("mtbench", regenerate=True)
    assert len(mt) == 80 and all(len(p.messages) == 2 for p in mt)
    assert mt[0].messages[0]["content"].startswith("Compose an engaging travel blog post")
