"""Drafters for `speculative_decode`: the EAGLE-3 draft (chain) and prompt lookup (n-gram).

EAGLE-3 pairs the target state g_t with the token x_{t+1}: after the target emits tokens the
draft re-reads them together with the target's aux states (its own chain guesses are cropped
from its cache first), so its cache always mirrors the target's committed text. Chain steps
feed the draft's pre-norm `h_out` forward in place of target states.
"""

from __future__ import annotations

from typing import Any

import torch

from specctl.evaluate.specdec import Proposal


class PromptLookupDrafter:
    """Copy the continuation of the latest earlier occurrence of the last n tokens (n = 2, then 1).

    Like HF `prompt_lookup_num_tokens` with `max_matching_ngram_size=2`, except that the most
    recent match wins (HF takes the first).
    """

    name = "prompt-lookup"
    needs_aux = False

    def __init__(self, max_ngram: int = 2) -> None:
        self.max_ngram = max_ngram
        self.history = torch.empty(0, dtype=torch.long)

    def start(self, prompt: torch.Tensor, aux: torch.Tensor | None, first: int) -> None:
        self.history = torch.cat([prompt.long(), torch.tensor([first])])

    def propose(self, k: int, temperature: float, gen: torch.Generator | None) -> Proposal:
        h = self.history  # [L]
        for n in range(self.max_ngram, 0, -1):
            if h.numel() <= n:
                continue
            windows = h[:-1].unfold(0, n, 1)  # [L-n, n]: every earlier n-gram (not the tail itself)
            hits = (windows == h[-n:]).all(dim=1).nonzero().flatten()
            if hits.numel():
                start = int(hits[-1]) + n
                return Proposal(tokens=h[start : start + k].clone())
        return Proposal(tokens=torch.empty(0, dtype=torch.long))

    def advance(self, tokens: torch.Tensor, aux: torch.Tensor | None) -> None:
        self.history = torch.cat([self.history, tokens.long()])


class Eagle3Drafter:
    """Chain drafting with an `Eagle3Draft`: k sequential one-token steps."""

    name = "eagle3"
    needs_aux = True

    def __init__(self, draft: Any, aux_layers: list[int] | None = None) -> None:
        self.draft = draft.eval()
        self.aux_layers = aux_layers  # target layers it reads (None = the default)
        vd = int(draft.d2t.numel())
        self._draft_to_target = torch.arange(vd) + draft.d2t.long()  # [Vd]
        self._vocab = int(draft.t2d.numel())
        self.cache: Any = None
        self._logits = torch.empty(0)  # [Vd] draft logits for the next token
        self._h = torch.empty(0)  # [1, 1, H] pre-norm state that produced them

    @torch.inference_mode()
    def start(self, prompt: torch.Tensor, aux: torch.Tensor | None, first: int) -> None:
        self.cache = self._new_cache()
        assert aux is not None
        # (x_{t+1}, g_t) pairs: tokens shifted one left, ending with the target's first token.
        self._read(torch.cat([prompt[1:].long(), torch.tensor([first])]), aux)

    def _new_cache(self) -> Any:
        from specctl.draft.eagle3 import DraftCache

        return DraftCache()

    @torch.inference_mode()
    def advance(self, tokens: torch.Tensor, aux: torch.Tensor | None) -> None:
        assert aux is not None
        self._read(tokens.long(), aux)

    def _read(self, tokens: torch.Tensor, aux: torch.Tensor) -> None:
        """tokens [n], aux [n, k*H]: append n committed positions to the draft cache."""
        start = self.cache.length
        hidden = self.draft.combine(aux[None].to(self.draft.fc.weight.dtype))  # [1, n, H]
        pos = torch.arange(start, start + tokens.numel())[None]  # [1, n]
        logits, h = self.draft.decode(tokens[None], hidden, pos, self.cache)  # [1,n,Vd], [1,n,H]
        self._logits, self._h = logits[0, -1].float(), h[:, -1:]

    @torch.inference_mode()
    def propose(self, k: int, temperature: float, gen: torch.Generator | None) -> Proposal:
        keep = self.cache.length
        logits, h = self._logits, self._h
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        for j in range(k):
            if temperature > 0:
                q = torch.softmax(logits / temperature, dim=-1)  # [Vd]
                d = int(torch.multinomial(q, 1, generator=gen))
                full = torch.zeros(self._vocab)  # [V]: zero outside the draft vocab
                full[self._draft_to_target] = q
                probs.append(full)
            else:
                d = int(logits.argmax())
            tokens.append(int(self._draft_to_target[d]))
            if j == k - 1:
                break
            ids = torch.tensor([[tokens[-1]]])
            pos = torch.tensor([[keep + j]])
            lg, h = self.draft.decode(ids, h, pos, self.cache)  # [1,1,Vd], [1,1,H]
            logits = lg[0, -1].float()
        self.cache.crop(keep)  # chain guesses leave; accepted tokens come back with target states
        return Proposal(
            tokens=torch.tensor(tokens, dtype=torch.long),
            probs=torch.stack(probs) if probs else None,
        )
