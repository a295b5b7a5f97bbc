"""Drafters for `speculative_decode`: the EAGLE-3 draft (chain), the MLP speculator (chain of
its heads), prompt lookup (n-gram) and the two combined (`HybridDrafter`).

EAGLE-3 pairs the target state g_t with the token x_{t+1}: after the target emits tokens the
draft re-reads them together with the target's aux states (its own chain guesses are cropped
from its cache first), so its cache always mirrors the target's committed text. Chain steps
feed the draft's pre-norm `h_out` forward in place of target states.
"""

from __future__ import annotations

from typing import Any

import torch

from specctl.evaluate.confidence import Calibration
from specctl.evaluate.specdec import CostModel, Proposal


class PromptLookupDrafter:
    """Copy the continuation of the latest earlier occurrence of the last n tokens (n = 2, then 1).

    Like HF `prompt_lookup_num_tokens` with `max_matching_ngram_size=2`, except that the most
    recent match wins (HF takes the first). `min_ngram` = 2 proposes only on two-token matches.

    `learn_confidence`: report, per guess, how often guesses at that position after a match
    of that size were right so far (all of them up to it; kept across prompts), so the loop's
    cost-aware length (`cost`, as in Eagle3Drafter) can cut lookup's guesses like a calibrated
    draft's. Only past rounds count: the proposal still reads nothing but the text so far.
    """

    name = "prompt-lookup"
    needs_aux = False

    def __init__(self, max_ngram: int = 2, min_ngram: int = 1, learn_confidence: bool = False):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.history = torch.empty(0, dtype=torch.long)
        self.learn = learn_confidence
        self.cost: CostModel | None = None  # used with learn_confidence
        self._tried: dict[int, list[int]] = {}  # n-gram size -> rounds that guessed position i
        self._right: dict[int, list[int]] = {}  # ... whose guesses 0..i were all right
        self._pending: tuple[int, list[int]] | None = None  # (n-gram size, guesses) last round

    def start(self, prompt: torch.Tensor, aux: torch.Tensor | None, first: int) -> None:
        self.history = torch.cat([prompt.long(), torch.tensor([first])])
        self._pending = None

    def propose(self, k: int, temperature: float, gen: torch.Generator | None) -> Proposal:
        h = self.history  # [L]
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if h.numel() <= n:
                continue
            windows = h[:-1].unfold(0, n, 1)  # [L-n, n]: every earlier n-gram (not the tail itself)
            hits = (windows == h[-n:]).all(dim=1).nonzero().flatten()
            if hits.numel():
                start = int(hits[-1]) + n
                tokens = h[start : start + k].clone()
                conf = self._confidence(n, tokens)
                if conf is not None and self.cost is not None:
                    conf = conf[: self.cost.best_length(conf, drafted=0)]
                    tokens = tokens[: len(conf)]
                return Proposal(tokens=tokens, conf=conf)
        self._pending = None
        return Proposal(tokens=torch.empty(0, dtype=torch.long))

    def _confidence(self, n: int, tokens: torch.Tensor) -> list[float] | None:
        if not self.learn:
            return None
        self._pending = (n, tokens.tolist())
        tried, right = self._tried.setdefault(n, []), self._right.setdefault(n, [])
        conf, out = 1.0, []
        for i in range(tokens.numel()):
            t, r = (tried[i], right[i]) if i < len(tried) else (0, 0)
            conf = min(conf, (r + 1) / (t + 2))  # a prior of 1/2; cumulative: never rises
            out.append(conf)
        return out

    def advance(self, tokens: torch.Tensor, aux: torch.Tensor | None) -> None:
        if self._pending is not None:
            self._score(*self._pending, tokens.tolist())
            self._pending = None
        self.history = torch.cat([self.history, tokens.long()])

    def _score(self, n: int, guesses: list[int], emitted: list[int]) -> None:
        """Count the last guesses against the emitted text: right up to the first miss; when
        every emitted token matched, the guesses past them are unknown (maybe never verified)."""
        right = 0
        while right < min(len(guesses), len(emitted)) and guesses[right] == emitted[right]:
            right += 1
        known = right if right == len(emitted) else min(right + 1, len(guesses))
        tried, ok = self._tried[n], self._right[n]
        while len(tried) < known:
            tried.append(0)
            ok.append(0)
        for i in range(known):
            tried[i] += 1
            ok[i] += i < right


class Eagle3Drafter:
    """Chain drafting with an `Eagle3Draft`: up to k sequential one-token steps.

    Adaptive k (EAGLE-2's confidence cut, chain form): with `adaptive_threshold` t > 0 the
    chain stops before a token whose cumulative draft confidence (product of the top-1
    probabilities so far; of the sampled token's probability when sampling) falls below t,
    so low-confidence rounds skip the remaining draft steps, and a round proposing nothing
    verifies at q=1 (a plain decode step) instead of a padded q=5. Any stopping rule that only
    reads the draft's own outputs keeps greedy output identical and sampling unbiased.

    Cost-aware length (`cost`, a `specdec.CostModel`): drafting also stops once no further
    token could be worth its verify, and the chain is cut to the length with the most
    expected tokens per decode step. The proposal carries the cumulative confidences.

    `learn_confidence`: each token's probability goes through a `confidence.Calibration`
    learned from the rounds verified so far (how often guesses that sure were accepted)
    before the cut and the cost model read it.

    Naps (cost-aware only): a round that proposes nothing still pays the draft's read of
    the emitted tokens and its first guess, 5-10% of a decode step here, so a draft that
    cannot pay on this text makes decoding slower than the target alone. After `IDLE` empty
    proposals in a row the draft sleeps for a nap of rounds (1, 2, 4, ... up to `MAX_NAP`,
    doubling while it wakes only to propose nothing again, back to 1 once it proposes):
    asleep it proposes nothing and only queues the emitted tokens and their target states,
    which it reads in one forward when it wakes. What it proposes still depends only on the
    committed text, so greedy output stays the target's own.
    """

    IDLE = 2  # empty proposals in a row before a nap
    MAX_NAP = 16  # rounds

    name = "eagle3"
    needs_aux = True

    def __init__(
        self,
        draft: Any,
        aux_layers: list[int] | None = None,
        adaptive_threshold: float = 0.0,
        learn_confidence: bool = False,
        naps: bool = True,
    ) -> None:
        self.draft = draft.eval()
        self.aux_layers = aux_layers  # target layers it reads (None = the default)
        self.may_nap = naps
        self.threshold = adaptive_threshold
        self.cost: CostModel | None = None  # set by the caller: cost-aware length
        self.calibration = Calibration() if learn_confidence else None
        vd = int(draft.d2t.numel())
        self._draft_to_target = torch.arange(vd) + draft.d2t.long()  # [Vd]: gather on ids only
        self._vocab = int(draft.t2d.numel())
        self._pos = torch.arange(1024)[None]  # [1, P] position ids, sliced (grown when needed)
        self.cache: Any = None
        self._logits = torch.empty(0)  # [Vd] draft logits for the next token
        self._h = torch.empty(0)  # [1, 1, H] pre-norm state that produced them
        self._idle, self._nap, self._asleep = 0, 1, 0  # empty proposals, next nap, rounds left
        self._queued: list[tuple[torch.Tensor, torch.Tensor]] = []  # unread (tokens, aux)
        self.slept = 0  # rounds slept (all prompts)

    @property
    def naps(self) -> int | None:
        """Rounds slept (eval-accept reports it); None for a drafter that never naps."""
        return self.slept if self.may_nap else None

    @torch.inference_mode()
    def start(self, prompt: torch.Tensor, aux: torch.Tensor | None, first: int) -> None:
        self.cache = self._new_cache()
        assert aux is not None
        if self.calibration is not None:
            self.calibration.forget()
        self._idle, self._nap, self._asleep, self._queued = 0, 1, 0, []
        # (x_{t+1}, g_t) pairs: tokens shifted one left, ending with the target's first token.
        self._read(torch.cat([prompt[1:].long(), torch.tensor([first])]), aux)

    def _new_cache(self) -> Any:
        from specctl.draft.eagle3 import DraftCache

        return DraftCache()

    @torch.inference_mode()
    def advance(self, tokens: torch.Tensor, aux: torch.Tensor | None) -> None:
        assert aux is not None
        if self.calibration is not None:
            self.calibration.score(tokens.tolist())
        if self._queued or self._asleep:  # asleep: read it all when waking
            self._queued.append((tokens.long(), aux))
            return
        self._read(tokens.long(), aux)

    def _wake(self) -> None:
        """Read the tokens queued while asleep in one forward (their aux rows are in order)."""
        tokens, aux = zip(*self._queued, strict=True)
        self._queued = []
        self._read(torch.cat(tokens), torch.cat(aux))

    def _after(self, proposed: int) -> None:
        """Nap bookkeeping after a proposal of `proposed` tokens (cost-aware rounds only)."""
        if proposed or not self.may_nap:
            self._idle, self._nap = 0, 1
            return
        self._idle += 1
        if self._idle >= self.IDLE:
            self._asleep, self._idle = self._nap, self.IDLE - 1  # waking empty: nap again
            self._nap = min(2 * self._nap, self.MAX_NAP)

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
        if self._asleep:
            self._asleep -= 1
            self.slept += 1
            return Proposal(tokens=torch.empty(0, dtype=torch.long), conf=[])
        if self._queued:
            self._wake()
        keep = self.cache.length
        logits, h = self._logits, self._h  # [Vd], [1, 1, H]
        tokens = torch.empty(k, dtype=torch.long)  # [k] target ids, filled without .item()
        probs: list[torch.Tensor] = []  # [Vd] each, sampling only
        confs: list[float] = []  # cumulative confidence after each proposed token
        raw: list[float] = []  # each token's own draft probability (given the chain before it)
        conf, n = 1.0, 0
        for j in range(k):
            # 1. Pick a draft-vocab id (argmax or sample); map THAT id to the target vocab.
            if temperature > 0:
                q = torch.softmax(logits / temperature, dim=-1)  # [Vd]
                d = torch.multinomial(q, 1, generator=gen)[0]  # 0-d: no .item()
            else:
                d = logits.argmax()  # 0-d
            # 2. Adaptive k: stop before a token the draft itself doubts (cumulative confidence).
            raw.append(float(q[d] if temperature > 0 else torch.softmax(logits, -1)[d]))
            conf *= self.calibration(raw[-1]) if self.calibration else raw[-1]
            if conf < self.threshold:
                break
            confs.append(conf)
            tokens[j] = self._draft_to_target[d]
            if temperature > 0:
                probs.append(q)
            n = j + 1
            if j == k - 1 or (self.cost and not self.cost.worth_drafting(confs, k)):
                break
            # 3. One draft step on the token just proposed, fed its own pre-norm state.
            lg, h = self.draft.decode(
                tokens[j : j + 1][None], h, self._positions(keep + j, 1), self.cache
            )
            logits = lg[0, -1].float()  # [Vd]
        self.cache.crop(keep)  # chain guesses leave; accepted tokens come back with target states
        if self.calibration is not None:  # every drafted guess is scored, proposed or not
            self.calibration.expect(tokens[:n].tolist(), raw[:n])
        if self.cost is not None:  # 4. cost-aware length, and naps when it is 0 again and again
            n = self.cost.best_length(confs)
            confs, probs = confs[:n], probs[:n]
            self._after(n)
        full: torch.Tensor | None = None
        if probs:  # one scatter for the whole chain: zero outside the draft vocab
            full = torch.zeros(n, self._vocab)  # [n, V]
            full[:, self._draft_to_target] = torch.stack(probs)
        return Proposal(tokens=tokens[:n], probs=full, conf=confs)


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

    def __init__(
        self, draft: Any, adaptive_threshold: float = 0.0, learn_confidence: bool = False
    ) -> None:
        self.draft = draft.eval()
        self.n_predict = int(draft.n_predict)
        self.threshold = adaptive_threshold
        self.cost: CostModel | None = None  # as in Eagle3Drafter
        self.calibration = Calibration() if learn_confidence else None  # as in Eagle3Drafter
        self._state = torch.empty(0)  # [1, H] target state that emitted `_token`
        self._token = torch.empty(0, dtype=torch.long)  # [1]

    def start(self, prompt: torch.Tensor, aux: torch.Tensor | None, first: int) -> None:
        assert aux is not None
        self._state, self._token = aux[-1:], torch.tensor([first])  # the prefill's last row
        if self.calibration is not None:
            self.calibration.forget()

    def advance(self, tokens: torch.Tensor, aux: torch.Tensor | None) -> None:
        assert aux is not None  # aux[j] emitted tokens[j]: the last pair feeds head 0
        self._state, self._token = aux[-1:], tokens[-1:].long()
        if self.calibration is not None:
            self.calibration.score(tokens.tolist())

    @torch.inference_mode()
    def propose(self, k: int, temperature: float, gen: torch.Generator | None) -> Proposal:
        steps = min(k, self.n_predict)
        state, tok = self._state, self._token  # [1, H], [1]
        tokens = torch.empty(steps, dtype=torch.long)  # [k'] target ids (full vocab)
        probs: list[torch.Tensor] = []  # [V] each, sampling only
        confs: list[float] = []  # cumulative confidence after each proposed token
        raw: list[float] = []  # each token's own probability (given the chain before it)
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
            raw.append(float(q[d] if temperature > 0 else torch.softmax(lg, -1)[d]))
            conf *= self.calibration(raw[-1]) if self.calibration else raw[-1]
            if conf < self.threshold:
                break
            confs.append(conf)
            tokens[i] = d
            if temperature > 0:
                probs.append(q)
            n, tok = i + 1, tokens[i : i + 1]  # 3. the guess feeds the next head
            if self.cost and not self.cost.worth_drafting(confs, steps):
                break
        if self.calibration is not None:  # every drafted guess is scored, proposed or not
            self.calibration.expect(tokens[:n].tolist(), raw[:n])
        if self.cost is not None:  # 4. cost-aware length
            n = self.cost.best_length(confs)
            confs, probs = confs[:n], probs[:n]
        return Proposal(tokens=tokens[:n], probs=torch.stack(probs) if probs else None, conf=confs)


class HybridDrafter:
    """Prompt lookup where the text repeats an n-gram it already holds, the trained draft
    everywhere else.

    A long exact copy (a quoted passage, code being edited, an extraction answer) is where
    lookup's guesses are accepted whole and a small draft's are not; elsewhere lookup has
    nothing to offer. When both propose, the one expecting more accepted tokens (the sum of
    its cumulative confidences: the draft's own, lookup's learned ones; per decode step when
    both have a `cost`) goes to the verify. Both see every emitted token (the draft's cache
    stays in step even in rounds it does not propose). The choice reads only the text so
    far, so greedy output stays the target's own and sampling stays unbiased.
    """

    needs_aux = True

    def __init__(self, lookup: PromptLookupDrafter, draft: Any) -> None:
        self.lookup, self.draft = lookup, draft
        self.name = f"{draft.name}+lookup"

    @property
    def cost(self) -> CostModel | None:
        return self.lookup.cost

    @cost.setter
    def cost(self, model: CostModel | None) -> None:
        self.lookup.cost = self.draft.cost = model

    @property
    def naps(self) -> int | None:
        """Rounds the draft slept through (`Eagle3Drafter` naps), None for other drafts."""
        return getattr(self.draft, "naps", None)

    def start(self, prompt: torch.Tensor, aux: torch.Tensor | None, first: int) -> None:
        self.lookup.start(prompt, None, first)
        self.draft.start(prompt, aux, first)

    def propose(self, k: int, temperature: float, gen: torch.Generator | None) -> Proposal:
        found = self.lookup.propose(k, temperature, gen)
        if not found.tokens.numel():
            return self.draft.propose(k, temperature, gen)
        if found.conf is None:  # nothing learned to weigh it by: a match wins
            return found
        mine = self.draft.propose(k, temperature, gen)
        cost = self.lookup.cost
        if cost is None:
            return found if sum(found.conf) >= sum(mine.conf or []) else mine
        return found if cost.rate(found.conf) >= cost.rate(mine.conf or []) else mine

    def advance(self, tokens: torch.Tensor, aux: torch.Tensor | None) -> None:
        self.lookup.advance(tokens, None)
        self.draft.advance(tokens, aux)
