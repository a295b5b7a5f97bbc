"""Run greedy generation in vLLM (optionally with an EAGLE-3 draft dir) in its own process.

`python -m tests.engines.vllm_spec ARGS.json OUT.pt`: ARGS = {"target", "draft" (or null),
"prompts" (token id lists), "max_tokens", "k"}. OUT gets the generated ids and, with a draft,
the drafter's first-round inputs and logits (hooked on `runner.drafter.model`) of prompt 0.
One process per engine: vLLM keeps global state, and each engine holds its own KV space.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch


def _runner(llm: Any) -> Any:
    core = llm.llm_engine.engine_core.engine_core  # in-process client (no multiprocessing)
    return core.model_executor.driver_worker.worker.model_runner


def _hook_first_round(model: Any, box: dict[str, torch.Tensor]) -> None:
    """Record the drafter's first call of combine / forward / compute_logits after startup."""
    combine, compute = model.combine_hidden_states, model.compute_logits

    def combine_hook(h: torch.Tensor) -> torch.Tensor:
        box.setdefault("aux", h.detach().clone())
        return combine(h)

    def compute_hook(h: torch.Tensor) -> torch.Tensor:
        out = compute(h)
        box.setdefault("logits", out.detach().clone())
        return out

    def pre_forward(_mod: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        pos = kwargs.get("positions", args[1] if len(args) > 1 else None)
        if "input_ids" not in box:
            box["input_ids"], box["positions"] = ids.detach().clone(), pos.detach().clone()

    model.combine_hidden_states, model.compute_logits = combine_hook, compute_hook
    model.register_forward_pre_hook(pre_forward, with_kwargs=True)


def main(args_path: str, out_path: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    a = json.loads(Path(args_path).read_text())
    kw: dict[str, Any] = {}
    if a.get("draft"):
        kw["speculative_config"] = {
            "method": "eagle3",
            "model": a["draft"],
            "num_speculative_tokens": a.get("k", 3),
        }
    llm = LLM(
        model=a["target"],
        skip_tokenizer_init=True,
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        enable_prefix_caching=False,
        disable_log_stats=False,
        **kw,
    )
    box: dict[str, Any] = {}
    if a.get("draft"):
        _hook_first_round(_runner(llm).drafter.model, box)
    sp = SamplingParams(max_tokens=a["max_tokens"], temperature=0.0, detokenize=False)
    outs = []
    for p in a["prompts"]:  # one at a time: the hook's first round is prompt 0's alone
        o = llm.generate([TokensPrompt(prompt_token_ids=p)], sp, use_tqdm=False)[0]
        outs.append(list(o.outputs[0].token_ids))
    box["outputs"] = outs
    box["metrics"] = _spec_metrics(llm)
    torch.save(box, out_path)


def _spec_metrics(llm: Any) -> dict[str, float]:
    """Accepted draft tokens and draft rounds from vLLM's own counters."""
    got: dict[str, float] = {}
    for m in llm.get_metrics():
        if m.name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_accepted_tokens"):
            got[m.name.split(":")[1]] = float(getattr(m, "value", 0))
    return got


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
