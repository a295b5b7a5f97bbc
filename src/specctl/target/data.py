"""Prompt datasets -> a list of `Prompt`s in a stable order (the index of a sample id).

Inputs go through `datasets`: jsonl/json/parquet files or a `save_to_disk` folder, plus the
built-in sources (see `sources`). Row formats, first match wins:
  `input_ids` + `loss_mask`  pre-tokenised (used as is),
  `messages`                 OpenAI [{role, content}] (content may be a list of text parts),
  `conversations`            ShareGPT [{from, value}],
  `turns`                    MT-Bench: user turns only (answers come from --regenerate),
  `text`                     plain text: no template, every token trained.
Rows that give nothing usable are dropped before indexing, so an index always names the same
prompt; a dataset with no usable row is an InputError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specctl.errors import InputError
from specctl.target import sources
from specctl.target.template import Message, Tokenized

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}


@dataclass
class Prompt:
    """Exactly one of the three is set."""

    messages: list[Message] | None = None
    text: str | None = None
    tokens: Tokenized | None = None


def load_prompts(spec: str, regenerate: bool = False) -> list[Prompt]:
    """`spec` is a built-in source name or a path; `regenerate` accepts user-only conversations."""
    rows = _load_rows(spec)
    prompts = [
        p for p in (row_to_prompt(r) for r in rows) if p is not None and usable(p, regenerate)
    ]
    if not prompts:
        need = "a user turn" if regenerate else "an assistant turn (or use --regenerate)"
        raise InputError(
            f"dataset {spec!r} has no usable turns ({len(rows)} rows; each needs "
            f"{need}, or text, or input_ids + loss_mask)"
        )
    return prompts


def usable(p: Prompt, regenerate: bool) -> bool:
    if p.tokens is not None:
        return len(p.tokens.input_ids) > 0
    if p.text is not None:
        return bool(p.text.strip())
    roles = {m["role"] for m in p.messages or [] if m["content"].strip()}
    return "user" in roles if regenerate else "assistant" in roles


def row_to_prompt(row: dict[str, Any]) -> Prompt | None:
    if row.get("input_ids") is not None and row.get("loss_mask") is not None:
        ids, mask = [int(i) for i in row["input_ids"]], [int(m) for m in row["loss_mask"]]
        if len(ids) != len(mask):
            raise InputError(
                f"input_ids and loss_mask differ in length ({len(ids)} vs {len(mask)})"
            )
        return Prompt(tokens=Tokenized(ids, mask))
    if row.get("messages"):
        return Prompt(
            messages=[
                {"role": str(m["role"]), "content": _content(m.get("content"))}
                for m in row["messages"]
            ]
        )
    if row.get("conversations"):
        msgs = [
            {
                "role": _SHAREGPT_ROLES.get(str(m.get("from", "")).lower(), ""),
                "content": _content(m.get("value")),
            }
            for m in row["conversations"]
        ]
        return Prompt(messages=[m for m in msgs if m["role"]])
    if row.get("turns"):
        return Prompt(messages=[{"role": "user", "content": str(t)} for t in row["turns"]])
    if isinstance(row.get("text"), str):
        return Prompt(text=row["text"])
    return None


def _content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content)


def _load_rows(spec: str) -> list[dict[str, Any]]:
    if spec == "chatterbot":
        return sources.chatterbot_rows()
    if spec == "mtbench":
        return _load_path(sources.mtbench_file())
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(
            f"dataset {spec!r} not found",
            f"a file, a saved dataset folder, or one of: {', '.join(sources.BUILTIN)}",
        )
    return _load_path(path)


def _load_path(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl" and path.is_file():
        _check_jsonl(path)
    import datasets

    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            ds: Any = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        else:
            kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
            if kind is None:
                raise InputError(
                    f"unsupported dataset file {path.name!r}",
                    "use .jsonl, .json, .parquet or a saved dataset folder",
                )
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except InputError:
        raise
    except Exception as e:  # datasets raises many types for unreadable files
        raise InputError(f"cannot read dataset {path}: {str(e).splitlines()[0]}") from None
    return list(ds)


def _check_jsonl(path: Path) -> None:
    """Name the bad line: datasets only logs a pyarrow error and raises a generic one."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {n} is not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise InputError(f"{path} line {n} is not a JSON object")
