"""The production engine on GPU hosts: SGLang's offline `Engine` with stock aux capture.

Stock SGLang (>= 0.5.23) captures EAGLE-3 aux states without a draft model:
`enable_return_aux_hidden_states=True, speculative_algorithm="EAGLE3"` plus
`return_aux_hidden_state_layer_ids`, and a request with `return_hidden_states=True` gets
`meta_info["hidden_states"]` = the captured layers concatenated, [T, m*H].

Traps (reference/sglang-mooncake.md §1) and what we do:
- SGLang adds 1 to the ids it is given ("layer i takes the output of layer i-1"), so passing
  our 0-based *output* ids gives exactly HF `hidden_states[i + 1]`; we pass them unchanged.
- With aux capture on, `hidden_states` holds the aux concat *instead of* the post-norm last
  state, and the last layer's output cannot be captured at all. We therefore also capture
  the output of layer N-2 (the input of the last layer) and run the last decoder layer and
  the final norm ourselves (`FinalTail`: those weights only, HF modules, same GPU), which is
  the target's own computation: last = norm(layer_{N-1}(h_{N-2})). Cost: one layer of N.
- Prefill returns only tokens it computed: a radix-cache hit drops the cached prefix and
  chunked prefill splits the rows, so `disable_radix_cache=True, chunked_prefill_size=-1`.
- States come back as Python float lists (`tensor.tolist()`): slow for big models; the
  zero-copy route is a scheduler patch (TorchSpec, SpecForge) and out of scope here.
- Regeneration uses SGLang's sampler with a per-request `sampling_seed`; greedy is exact,
  sampled text matches the hf engine's only in distribution, not token for token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specctl.errors import InputError
from specctl.target.engines import Captured, SamplingParams, check_aux_layers
from specctl.target.models import load_tokenizer
from specctl.target.template import Tokenized


class FinalTail(nn.Module):
    """The target's last decoder layer + final norm, loaded alone: h_{N-2} -> (h_{N-1}, last)."""

    def __init__(self, model_path: Path, device: str, dtype: torch.dtype) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(model_path)
        n = int(cfg.num_hidden_layers)
        with torch.device("meta"):  # no memory for the other N-1 layers, embeddings, lm_head
            skeleton = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
        base: Any = skeleton.get_decoder()
        self.layer, self.norm = base.layers[n - 1], base.norm
        prefix = _module_prefix(skeleton, base)
        weights = _load_prefixed(model_path, [f"{prefix}layers.{n - 1}.", f"{prefix}norm."])
        self.layer.load_state_dict(
            {
                k.split(f"layers.{n - 1}.", 1)[1]: v
                for k, v in weights.items()
                if f"layers.{n - 1}." in k
            },
            assign=True,
        )
        self.norm.load_state_dict(
            {
                k.split("norm.", 1)[1]: v
                for k, v in weights.items()
                if k.startswith(f"{prefix}norm.")
            },
            assign=True,
        )
        with torch.device(device):  # inv_freq is computed at init: build it off meta, and
            self.rotary = type(base.rotary_emb)(config=cfg)  # keep it fp32 as HF does
        self.layer.to(device=device, dtype=dtype).eval()
        self.norm.to(device=device, dtype=dtype).eval()

    @torch.inference_mode()
    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, H] (one sequence, no padding) -> (layer N-1 output [T, H], last [T, H])."""
        x = h[None]  # [1, T, H]
        pos = torch.arange(h.shape[0], device=h.device)[None]  # [1, T]
        out = self.layer(
            x, attention_mask=None, position_ids=pos, position_embeddings=self.rotary(x, pos)
        )  # sdpa: causal when mask is None
        out = out[0] if isinstance(out, tuple) else out
        return out[0], self.norm(out)[0]


class SGLangEngine:
    def __init__(
        self,
        model_path: Path,
        *,
        aux_layers: list[int] | None = None,
        token_budget: int = 8192,
        **engine_kwargs: Any,
    ) -> None:
        try:
            import sglang
        except ImportError:
            raise InputError(
                "--engine sglang needs SGLang on a GPU host",
                "install the sglang extra of specctl (CUDA 13), or use --engine hf",
            ) from None
        cfg = json.loads((model_path / "config.json").read_text())
        self.num_layers = int(cfg["num_hidden_layers"])
        self.hidden_size = int(cfg["hidden_size"])
        self.aux_layers = check_aux_layers(aux_layers, self.num_layers)
        # what SGLang captures: the aux layers it can reach (not N-1) plus N-2 for the tail
        self._ids = sorted(
            {i for i in self.aux_layers if i < self.num_layers - 1} | {self.num_layers - 2}
        )
        self.tokenizer = load_tokenizer(model_path)
        self.stop_ids = {int(self.tokenizer.eos_token_id)}
        self.engine = sglang.Engine(
            model_path=str(model_path),
            dtype="bfloat16",
            skip_tokenizer_init=True,
            enable_return_aux_hidden_states=True,
            speculative_algorithm="EAGLE3",
            return_aux_hidden_state_layer_ids=self._ids,
            disable_radix_cache=True,
            chunked_prefill_size=-1,
            max_prefill_tokens=max(token_budget, 16384),
            **engine_kwargs,
        )
        self.tail = FinalTail(model_path, "cuda", torch.bfloat16)

    def capture(self, samples: list[Tokenized]) -> list[Captured]:
        outs = self.engine.generate(
            input_ids=[s.input_ids for s in samples],
            sampling_params={"max_new_tokens": 1, "temperature": 0.0},
            return_hidden_states=True,
        )
        res = []
        for s, out in zip(samples, outs, strict=True):
            t = len(s.input_ids)
            states = _rows(out["meta_info"]["hidden_states"], t).to("cuda")  # [T, m*H]
            by_id = dict(zip(self._ids, states.split(self.hidden_size, dim=-1), strict=True))
            h_final, last = self.tail(by_id[self.num_layers - 2])
            by_id[self.num_layers - 1] = h_final
            res.append(
                Captured(s.input_ids, s.loss_mask, [by_id[i] for i in self.aux_layers], last)
            )
        return res

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]
    ) -> list[list[int]]:
        sp = [
            {
                "max_new_tokens": params.max_new_tokens,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "sampling_seed": seed,
                "stop_token_ids": sorted(self.stop_ids),
            }
            for seed in seeds
        ]
        outs = self.engine.generate(input_ids=prompts, sampling_params=sp)
        return [list(o["output_ids"]) for o in outs]

    def close(self) -> None:
        self.engine.shutdown()


def _rows(hidden_states: list, t: int) -> torch.Tensor:
    """meta_info["hidden_states"] (one [n, m*H] float list per forward) -> [T, m*H] bf16."""
    chunks = [torch.tensor(h, dtype=torch.float32) for h in hidden_states]
    chunks = [c[None] if c.dim() == 1 else c for c in chunks]
    rows = torch.cat(chunks)[:t]
    if rows.shape[0] != t:
        raise RuntimeError(
            f"SGLang returned {rows.shape[0]} hidden rows for {t} prompt tokens "
            "(radix cache or chunked prefill active?)"
        )
    return rows.to(torch.bfloat16)


def _module_prefix(model: nn.Module, base: nn.Module) -> str:
    """'model.' for LlamaForCausalLM: the state-dict prefix of the decoder inside the LM."""
    for name, mod in model.named_modules():
        if mod is base:
            return f"{name}." if name else ""
    return ""


def _load_prefixed(model_path: Path, prefixes: list[str]) -> dict[str, torch.Tensor]:
    """Only the tensors under `prefixes` from the checkpoint's safetensors file(s)."""
    from safetensors import safe_open

    index = model_path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    out: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(model_path / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if any(key.startswith(p) for p in prefixes):
                    out[key] = f.get_tensor(key)
    return out
