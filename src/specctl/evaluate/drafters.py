"""Drafters for `speculative_decode`: the EAGLE-3 draft (chain), the MLP speculator (chain of
its heads) and prompt lookup (n-gram).

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
    """Chain drafting with an `Eagle3Draft`: up to k sequential one-token steps.

    Adaptive k (EAGLE-2's confidence cut, chain form): with `adaptive_threshold` t > 0 the
    chain stops before a token whose cumulative draft confidence (product of the top-1
    probabilities so far; of the sampled token's probability when sampling) falls below t,
    so low-confidence rounds skip the remaining draft steps, and a round proposing nothing
    verifies at q=1 (a plain decode step) instead of a padded q=5. Any stopping rule that only
    reads the draft's own outputs keeps greedy output identical and sampling unbiased.
    """

    name = "eagle3"
    needs_aux = True

    def __init__(
        self, draft: Any, aux_layers: list[int] | None = None, adaptive_threshold: float = 0.0
    ) -> None:
        self.draft = draft.eval()
        self.aux_layers = aux_layers  # target layers it reads (None = the default)
        self.threshold = adaptive_threshold
        vd = int(draft.d2t.numel())
        self._draft_to_target = torch.arange(vd) + draft.d2t.long()  # [Vd]: gather on ids only
        self._vocab = int(draft.t2d.numel())
        self._pos = torch.arange(1024)[None]  # [1, P] position ids, sliced (grown when needed)
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

    def _positions(self, start: int, n: int) -> torch.Tensor:
        """[1, n] positions start..start+n-1: a view of one preallocated arange."""
        if start + n > self._pos.shape[1]:
            self._pos = torch.arange(2 * (start + n))[None]
        return self._pos[:, start : start + n]

    def _read(self, tokens: torch.Tensor, aux: torch.Tensor) -> None:
        """tokens [n], aux [n, k*H]: append n committed positions to the draft cache."""
        pos = self._positions(self.cache.length, tokens.numel())  # [1, n]
        hidden = self.draft.combine(aux[None])  # [1, n, H]
        h = self.draft.decode_step(tokens[None], hidden, pos, self.cache)  # [1, n, H]
        self._h = h[:, -1:]  # [1, 1, H]
        self._logits = self.draft.decode_logits(self._h)[0, 0].float()  # [Vd]: last row only

    @torch.inference_mode()
    def propose(self, k: int, temperature: float, gen: torch.Generator | None) -> Proposal:
        keep = self.cache.length
        logits, h = self._logits, self._h  # [Vd], [1, 1, H]
        tokens = torch.empty(k, dtype=torch.long)  # [k] target ids, filled without .item()
        probs: list[torch.Tensor] = []  # [Vd] each, sampling only
        conf, n = 1.0, 0
        for j in range(k):
            # 1. Pick a draft-vocab id (argmax or sample); map THAT id to the target vocab.
            if temperature > 0:
                q = torch.softmax(logits / temperature, dim=-1)  # [Vd]
                d = torch.multinomial(q, 1, generator=gen)[0]  # 0-d: no .item()
            else:
                d = logits.argmax()  # 0-d
            # 2. Adaptive k: stop before a token the draft itself doubts (cumulative confidence).
            if self.threshold > 0:
                conf *= float(q[d] if temperature > 0 else torch.softmax(logits, -1)[d])
                if conf < self.threshold:
                    break
            tokens[j] = self._draft_to_target[d]
            if temperature > 0:
                probs.append(q)
            n = j + 1
            if j == k - 1:
                break
            # 3. One draft step on the token just proposed, fed its own pre-norm state.
            lg, h = self.draft.decode(
                tokens[j : j + 1][None], h, self._positions(keep + j, 1), self.cache
            )
            logits = lg[0, -1].float()  # [Vd]
        self.cache.crop(keep)  # chain guesses leave; accepted tokens come back with target states
        full: torch.Tensor | None = None
        if probs:  # one scatter for the whole chain: zero outside the draft vocab
            full = torch.zeros(n, self._vocab)  # [n, V]
            full[:, self._draft_to_target] = torch.stack(probs)
        return Proposal(tokens=tokens[:n], probs=full)


class MLPDrafter:
    """Chain drafting with an `MLPSpeculator`: head i proposes the chain's token i+1.

    Head 0 reads the target's last post-norm hidden state at the last position it verified
    and the token the target emitted from it (the verifier captures the final norm:
    `Verifier(last_hidden=True)`); head i > 0 reads head i-1's state and guess. Nothing is
    cached: every round starts from the newest target state, so rejected guesses need no
    rollback. A chain is at most n_predict long (eval-accept caps --k there). Adaptive k
    is `Eagle3Drafter`'s cumulative-confidence cut.
    """

    name = "mlp"
    needs_aux = True  # "aux" = the final-norm hidden state [n, H] (Verifier last_hidden)

    def __init__(self, draft: Any, adaptive_threshold: float = 0.0) -> None:
        self.draft = draft.eval()
        self.n_predict = int(draft.n_predict)
        self.threshold = adaptive_threshold
        self._state = torch.empty(0)  # [1, H] target state that emitted `_token`
        self._token = torch.empty(0, dtype=torch.long)  # [1]

    def start(self, prompt: torch.Tensor, aux: torch.Tensor | None, first: int) -> None:
        assert aux is not None
        self._state, self._token = aux[-1:], torch.tensor([first])  # the prefill's last row

    def advance(self, tokens: torch.Tensor, aux: torch.Tensor | None) -> None:
        assert aux is not None  # aux[j] emitted tokens[j]: the last pair feeds head 0
        self._state, self._token = aux[-1:], tokens[-1:].long()

    @torch.inference_mode()
    def propose(self, k: int, temperature: float, gen: torch.Generator | None) -> Proposal:
        steps = min(k, self.n_predict)
        state, tok = self._state, self._token  # [1, H], [1]
        tokens = torch.empty(steps, dtype=torch.long)  # [k'] target ids (full vocab)
        probs: list[torch.Tensor] = []  # [V] each, sampling only
        conf, n = 1.0, 0
        for i in range(steps):
            # 1. Head i on (previous state, previous token) -> logits over the target vocab.
            logits, state = self.draft.step(state, tok, i)  # [1, V], [1, D]
            lg = logits[0].float()  # [V]
            if temperature > 0:
                q = torch.softmax(lg / temperature, dim=-1)  # [V]
                d = torch.multinomial(q, 1, generator=gen)[0]
            else:
                d = lg.argmax()
            # 2. Adaptive k: stop before a token the draft itself doubts.
            if self.threshold > 0:
                conf *= float(q[d] if temperature > 0 else torch.softmax(lg, -1)[d])
                if conf < self.threshold:
                    break
            tokens[i] = d
            if temperature > 0:
                probs.append(q)
            n, tok = i + 1, tokens[i : i + 1]  # 3. the guess feeds the next head
        return Proposal(tokens=tokens[:n], probs=torch.stack(probs) if probs else None)
