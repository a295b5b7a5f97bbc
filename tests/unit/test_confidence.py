"""Learned draft confidence: guesses are scored only where the target's text checks them."""

from __future__ import annotations

import pytest

from specctl.evaluate.confidence import Calibration

pytestmark = pytest.mark.unit


def test_starts_at_the_drafts_own_probability() -> None:
    cal = Calibration()
    assert [cal(p) for p in (0.0, 0.05, 0.5, 0.97, 1.0)] == pytest.approx([0, 0.05, 0.5, 0.97, 1])


def test_scores_up_to_the_first_miss_and_only_what_the_text_reaches() -> None:
    cal = Calibration(bins=10)
    cal.expect([7, 8, 9], [0.95, 0.55, 0.15])
    cal.score([7, 4])  # first right, second wrong: the third was never checked
    assert cal.tried == [0, 0, 0, 0, 0, 1, 0, 0, 0, 1] and cal.right[9] == 1 and cal.right[5] == 0
    cal.expect([7, 8, 9], [0.95, 0.55, 0.15])
    cal.score([7, 8])  # another proposer won the round: the text reaches two guesses
    assert cal.tried[1] == 0 and cal.right[5] == 1 and cal.tried[9] == 2
    cal.score([1, 2, 3])  # nothing pending: no change
    cal.expect([1], [0.95])
    cal.forget()
    cal.score([1])
    assert sum(cal.tried) == 4 and sum(cal.right) == 3


def test_learns_an_overconfident_and_an_underconfident_draft() -> None:
    cal = Calibration(prior=20)
    for i in range(200):  # sure guesses right 1 in 10, unsure ones right 8 in 10
        cal.expect([1], [0.9])
        cal.score([1 if i % 10 == 0 else 2])
        cal.expect([1], [0.02])
        cal.score([1 if i % 10 < 8 else 2])
    assert cal(0.9) == pytest.approx((20 + 20 * 0.9) / 220)  # ~0.17, not 0.9
    assert 0.7 < cal(0.01) < 0.8 and cal(0.5) == 0.5  # an unseen bin keeps the prior
