"""The engine interface: what the producer needs from a target model, and nothing more.

An engine owns a loaded target and its tokenizer and does two things:
- `capture(samples)`: one forward pass per token-budget batch, returning per sample the
  pre-norm outputs of the aux decoder layers and the post-final-norm last hidden state;
- `generate(prompts, params, seeds)`: sampled continuations (regeneration, self-prompts),
  one seeded RNG per prompt so a sample does not depend on its batch-mates' draws.

`--aux-layers` ids are 0-based decoder-layer ids whose *outputs* are captured (HF
`hidden_states[i + 1]`; SGLang adds the +1 itself); default 1, N/2-1, N-4.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from specctl.errors import InputError, UsageError
from specctl.target.template import Tokenized

if TYPE_CHECKING:
    import torch


@dataclass
class Captured:
    """One sample's states, pads stripped: aux is k tensors [T, H], last is [T, H]."""

    input_ids: list[int]
    loss_mask: list[int]
    aux: list[torch.Tensor]
    last: torch.Tensor


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256


class Engine(Protocol):
    tokenizer: Any
    hidden_size: int
    num_layers: int
    aux_layers: list[int]
    stop_ids: set[int]

    def capture(self, samples: list[Tokenized]) -> list[Captured]: ...

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]
    ) -> list[list[int]]: ...

    def close(self) -> None: ...


_CACHE_KWARG: dict[type, str] = {}


def cache_kwarg(model: Any) -> str:
    """The forward kwarg an HF model takes its KV cache in: `cache` from transformers 5.25 on
    (`past_key_values` warns there and goes away in 5.40), `past_key_values` before."""
    cls = type(model)
    if cls not in _CACHE_KWARG:
        params = inspect.signature(cls.forward).parameters
        _CACHE_KWARG[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[cls]


def out_cache(out: Any) -> Any:
    """The KV cache an HF forward returned, under either name (see `cache_kwarg`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def default_aux_layers(num_layers: int) -> list[int]:
    """EAGLE-3 default: outputs of decoder layers 1, N/2-1, N-4 (HF hidden_states[2, N/2, N-3]).

    Targets under 8 layers (test models) may repeat a layer; repeats are dropped, clamped at 0.
    """
    return sorted({max(i, 0) for i in (1, num_layers // 2 - 1, num_layers - 4)})


def check_aux_layers(layers: list[int] | None, num_layers: int) -> list[int]:
    chosen = default_aux_layers(num_layers) if not layers else list(layers)
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad:
        raise InputError(
            f"aux layer(s) {bad} out of range: the target has {num_layers} decoder "
            f"layers (0-based ids 0..{num_layers - 1})"
        )
    if len(set(chosen)) != len(chosen):
        raise InputError(f"aux layers {chosen} repeat a layer")
    return sorted(chosen)


def build_engine(
    name: str,
    model_path: Path,
    *,
    device: str | None = None,
    aux_layers: list[int] | None = None,
    token_budget: int = 8192,
    precision: str | None = None,  # hf engine only: auto | fp32 | bf16 (specctl.precision)
) -> Engine:
    if name == "hf":
        from specctl.target.engines.hf import HFEngine

        return HFEngine(
            model_path,
            device=device,
            aux_layers=aux_layers,
            token_budget=token_budget,
            precision=precision,
        )
    if name == "sglang":
        from specctl.target.engines.sglang import SGLangEngine

        return SGLangEngine(model_path, aux_layers=aux_layers, token_budget=token_budget)
    if name == "vllm":
        from specctl.target.engines.vllm import VLLMEngine

        return VLLMEngine(
            model_path, device=device, aux_layers=aux_layers, token_budget=token_budget
        )
    raise UsageError(f"unknown engine {name!r}", "use --engine hf, sglang or vllm")
