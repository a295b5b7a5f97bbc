"""Forward hooks that keep only the states EAGLE-3 needs.

`output_hidden_states=True` materialises all N+1 layers' states; at 8B x 2k tokens that is
~1 GB per sample for 4 used tensors. Hooks on the chosen decoder layers (their outputs are the
pre-norm residual stream) and on the final norm (its output is the last hidden state) keep
exactly k + 1 tensors. A test checks they equal `hidden_states[i + 1]` / `hidden_states[-1]`.

Traps: decoder layers return a tensor in transformers 5 and a tuple in 4.x (we take [0]);
we keep references, not copies, which is safe because HF decoder layers build new tensors
(`residual + h`) rather than writing in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
    """(base model, its decoder layers, its final norm) for HF causal LMs (Llama, Qwen, ...)."""
    get_decoder = getattr(model, "get_decoder", None)
    base: Any = get_decoder() if callable(get_decoder) else model
    layers = getattr(base, "layers", None)
    norm = getattr(base, "norm", None)
    if not isinstance(layers, nn.ModuleList) or norm is None:
        raise TypeError(f"{type(model).__name__}: no `layers` + `norm` on its decoder")
    return base, layers, norm


class HiddenCapture:
    """`with HiddenCapture(model, [1, 14, 26]) as cap: base(...)`; then cap.aux, cap.last."""

    def __init__(self, model: nn.Module, aux_layers: list[int]) -> None:
        self.base, self.layers, self.norm = decoder_parts(model)
        self.aux_layers = aux_layers
        self.aux: list[torch.Tensor] = []
        self.last: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> HiddenCapture:
        self.aux, self.last = [], None
        for i in self.aux_layers:
            self._handles.append(self.layers[i].register_forward_hook(self._keep_aux))
        self._handles.append(self.norm.register_forward_hook(self._keep_last))
        return self

    def _keep_aux(self, _mod: nn.Module, _inp: Any, out: Any) -> None:
        self.aux.append(out[0] if isinstance(out, tuple) else out)  # [B, L, H]

    def _keep_last(self, _mod: nn.Module, _inp: Any, out: Any) -> None:
        self.last = out  # [B, L, H]

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
