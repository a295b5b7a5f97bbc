"""The target side of speculative decoding: one forward per step over its own KV cache.

The aux hidden states EAGLE-3 needs are captured with forward hooks on the target's decoder
layers (outputs of layers 1, N/2-1, N-4 by default, 0-based; the same convention as the
records the trainer reads), so a verify pass costs one forward and nothing else.

Decode and verify calls multiply a handful of rows by every weight: the model's linears take
the skinny path for them (`specctl.skinny`: 1.6x faster decode steps on the CPU here, and
verify costs relative to a step change with it, and `Verifier.verify_shapes` with them).

Trap (transformers 5.x): `DynamicCache.crop(n)` only accepts a negative n ("remove n
tokens"); a positive n raises. `crop` here takes the number of tokens to drop.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from specctl.skinny import use_skinny_linears
from specctl.target.engines import cache_kwarg, default_aux_layers

# cheap verify shapes measured on the 2-thread CPU here (docs/benchmarks.md, bench_decode.py)
VERIFY_SHAPES = (2, 4, 5, 6, 8)  # skinny linears: cost grows with q, only 3 and 7 are dear
VERIFY_SHAPES_MKL = (5, 8)  # F.linear: q = 2, 3, 4, 6, 7 cost more than 5 or 8
# what a verify of q = 1..8 positions costs, in decode steps (same source, 2 threads): the
# cost-aware chain cut (specdec.best_length) weighs these against the draft's confidences
VERIFY_COSTS = (1.0, 1.06, 1.36, 1.38, 1.60, 1.80, 2.02, 1.98)
VERIFY_COSTS_MKL = (1.0, 1.65, 2.12, 1.46, 1.37, 1.41, 1.75, 1.37)


def decoder_layers(model: Any) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no .model.layers: not a decoder-only HF model")
    return layers


class Verifier:
    """A causal LM with a DynamicCache; `forward(ids)` appends ids and returns logits (+ aux).

    `aux_layers` are 0-based decoder-layer ids whose outputs are captured (default 1, N/2-1, N-4).
    `last_hidden`: capture the final norm's output instead (the state lm_head reads), [q, H]:
    what an MLP speculator consumes. `skinny`: route forwards of <= 8 positions through
    `skinny_linear` until `close()` (prefills keep `F.linear`); `verify_shapes` follow it.
    """

    def __init__(
        self,
        model: Any,
        aux_layers: list[int] | None = None,
        last_hidden: bool = False,
        skinny: bool = True,
    ) -> None:
        self.model = model
        self.skinny = skinny
        if skinny:
            use_skinny_linears(model)
        layers = decoder_layers(model)
        self.aux_layers = aux_layers if aux_layers is not None else default_aux_layers(len(layers))
        self.capture = False
        self._captured: dict[int, torch.Tensor] = {}
        hooked: dict[int, nn.Module] = {i: layers[i] for i in self.aux_layers}
        if last_hidden:
            hooked = {-1: getattr(model, "model", model).norm}
        self._sources = list(hooked)  # captured in this order: layers low -> high, or [-1]
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in hooked.items()]
        self.cache: Any = None
        self.vocab_size = int(model.config.vocab_size)
        # the curve measured on this machine and refined while decoding (`calibrate.LiveCurve`:
        # .costs, .shapes, .observe); None: the constants
        self.curve: Any = None

    def _hook(self, layer: int) -> Any:
        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            if self.capture:
                self._captured[layer] = out[0] if isinstance(out, tuple) else out

        return hook

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    @property
    def length(self) -> int:
        return 0 if self.cache is None else int(self.cache.get_seq_length())

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        aux: bool = False,
        depth: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids [q] -> logits [q, V] fp32, aux [q, k*H] (layers low -> high) or None.

        Tree verify: `depth` [q] gives each query's position offset after the cache, and
        `visible` [q, q] bool which new queries each one sees (its ancestors and itself);
        every query sees the whole cache. Default: a causal chain.
        """
        if self.cache is None:
            self.reset()
        self.capture = aux
        self._captured.clear()
        start = self.length
        offs = torch.arange(ids.numel()) if depth is None else depth
        mask = None
        if visible is not None:  # 4D masks go to the attention kernel as is (additive, float)
            see = torch.cat([torch.ones(ids.numel(), start, dtype=torch.bool), visible], dim=1)
            dtype = self.model.dtype
            mask = torch.zeros(see.shape, dtype=dtype).masked_fill(~see, torch.finfo(dtype).min)
            mask = mask[None, None]  # [1, 1, q, start + q]
        t0 = time.perf_counter()
        out = self.model(
            input_ids=ids[None],
            use_cache=True,
            position_ids=(start + offs)[None],
            attention_mask=mask,
            **{cache_kwarg(self.model): self.cache},
        )
        self.capture = False
        logits = out.logits[0].float()
        if self.curve is not None and start and visible is None:  # a chain step or verify
            self.curve.observe(ids.numel(), (time.perf_counter() - t0) * 1e3)
        if not aux:
            return logits, None
        return logits, torch.cat([self._captured[i][0] for i in self._sources], dim=-1)

    @torch.inference_mode()
    def keep(self, start: int, rows: torch.Tensor) -> None:
        """Tree verify: keep the cache before `start` plus the new positions `rows` (accepted path).

        The accepted rows move down in place and the rest is cropped: rebuilding the cache
        with `torch.cat` copied all of it every round (~2 ms a round on SmolLM2 here).
        """
        m = rows.numel()
        if not torch.equal(rows, torch.arange(m)):  # a path that is not already a prefix
            src = start + rows
            for layer in self.cache.layers:
                layer.keys[:, :, start : start + m] = layer.keys[:, :, src]  # gathered first
                layer.values[:, :, start : start + m] = layer.values[:, :, src]
        self.crop(self.length - start - m)

    def crop(self, n_remove: int) -> None:
        """Drop the last `n_remove` cached positions (rejected drafts and verify padding)."""
        if n_remove > 0:
            self.cache.crop(-n_remove)

    @property
    def verify_shapes(self) -> tuple[int, ...]:
        """The query lengths worth padding a verify to on this verifier's cost curve: the
        measured one (`curve`, set from `calibrate.measure`) or the constants measured here."""
        if self.curve is not None:
            return tuple(self.curve.shapes)
        return VERIFY_SHAPES if self.skinny else VERIFY_SHAPES_MKL

    @property
    def verify_costs(self) -> tuple[float, ...]:
        """Cost of a verify of q = 1, 2, ... positions in decode steps, on the same curve."""
        if self.curve is not None:
            return tuple(self.curve.costs)
        return VERIFY_COSTS if self.skinny else VERIFY_COSTS_MKL

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.skinny:
            use_skinny_linears(self.model, False)
            self.skinny = False
            self.curve = None  # measured on the skinny path
