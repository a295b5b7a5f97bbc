"""How often a draft's guesses are really accepted, learned while decoding.

The cost-aware length (`specdec.CostModel`) trusts the draft's top-1 probability as the
chance its guess is accepted. A well-trained draft is calibrated on its own training
distribution, but a young one (the demo's, 86 steps) is overconfident: it proposed one
token in 147 of 176 rounds, 8% of them accepted, each paying a q = 2 verify. Prompts from
another source shift it too. `Calibration` keeps, per bin of the draft's conditional
probability, how many guesses the target checked and how many matched, and answers with the
observed rate, starting from the draft's own value (a prior worth `prior` guesses).

Only rounds already verified count, so a proposal still reads nothing but the text so far:
greedy output stays the target's own and sampling stays unbiased.
"""

from __future__ import annotations


class Calibration:
    """Draft probability -> observed acceptance rate, per bin, updated after every round."""

    def __init__(self, bins: int = 10, prior: float = 20.0) -> None:
        self.bins, self.prior = bins, prior
        self.tried = [0] * bins
        self.right = [0] * bins
        self._pending: tuple[list[int], list[float]] | None = None  # last round's guesses

    def _bin(self, p: float) -> int:
        return min(int(p * self.bins), self.bins - 1)

    def __call__(self, p: float) -> float:
        """The acceptance chance of a guess the draft gives probability p (given its prefix)."""
        b = self._bin(p)
        return (self.right[b] + self.prior * p) / (self.tried[b] + self.prior)

    def expect(self, guesses: list[int], probs: list[float]) -> None:
        """The chain drafted this round (target ids) and each token's conditional probability,
        scored against the emitted text by the next `score` (proposed in full or not)."""
        self._pending = (guesses, probs)

    def score(self, emitted: list[int]) -> None:
        """Count the pending guesses against the tokens the round emitted (the target's).

        A guess is checked when every guess before it was right and the text reaches its
        position: right up to the first miss, which is checked too if the text reaches it.
        """
        if self._pending is None:
            return
        guesses, probs = self._pending
        self._pending = None
        for i, (g, p) in enumerate(zip(guesses, probs, strict=True)):
            if i >= len(emitted):
                break
            b = self._bin(p)
            self.tried[b] += 1
            if g != emitted[i]:
                break
            self.right[b] += 1

    def forget(self) -> None:
        """Drop a pending round that was never verified."""
        self._pending = None
