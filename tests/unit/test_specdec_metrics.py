"""Acceptance accounting, the lossless gate and the report files, on hand-made decode results."""

from __future__ import annotations

from pathlib import Path

import pytest

from specctl.errors import SpecctlError
from specctl.evaluate import metrics, report
from specctl.evaluate.run import EvalConfig, _lossless
from specctl.evaluate.specdec import DecodeResult

pytestmark = pytest.mark.unit


def _res(accepted: list[int], proposed: list[int], tokens: list[int] | None = None) -> DecodeResult:
    emitted = [a + 1 for a in accepted]
    toks = tokens if tokens is not None else list(range(1 + sum(emitted)))
    return DecodeResult(
        tokens=toks,
        prefill_s=0.1,
        total_s=1.0,
        emitted=emitted,
        accepted=accepted,
        proposed=proposed,
        draft_s=0.2,
        verify_s=0.5,
    )


def test_summary_counts() -> None:
    rs = [_res([4, 0, 2], [4, 4, 4]), _res([1, 3], [4, 3])]
    s = metrics.summarize(rs, k=4)
    assert s["rounds"] == 5 and s["tokens"] == 1 + 9 + 1 + 6
    assert s["acceptance_length"] == pytest.approx((5 + 1 + 3 + 2 + 4) / 5)
    # position j: rounds with >= j+1 accepted / rounds with >= j+1 proposed
    assert s["accept_rate"] == pytest.approx([4 / 5, 3 / 5, 2 / 5, 1 / 4])
    assert s["accept_rate_cond"] == pytest.approx([4 / 5, 3 / 4, 2 / 3, 1 / 2])
    assert s["al_histogram"] == [1, 1, 1, 1, 1]
    t = s["time_ms_per_round"]
    assert t["draft"] == pytest.approx(400 / 5) and t["verify"] == pytest.approx(1000 / 5)
    assert t["overhead"] == pytest.approx((2000 - 200 - 400 - 1000) / 5)
    share = s["time_share"]
    assert share["verify"] == pytest.approx(1000 / 1800) and sum(share.values()) == pytest.approx(1)
    assert s["k_histogram"] == [0, 0, 0, 1, 4] and s["mean_k"] == pytest.approx(19 / 5)
    rows = {"target": {"tok_per_s": 10.0}, "eagle3": {"tok_per_s": 15.0}}
    metrics.add_speedups(rows)
    assert rows["eagle3"]["speedup"] == pytest.approx(1.5)


def test_lossless_gate() -> None:
    results = {
        "target": [_res([0], [0], [1, 2]), _res([0], [0], [3, 4])],
        "eagle3": [_res([0], [4], [1, 2]), _res([0], [4], [3, 5])],
    }
    drafters = {"eagle3": object()}
    assert _lossless(EvalConfig(), results, drafters) == {"eagle3": 1}
    with pytest.raises(SpecctlError, match=r"lossless check failed.*eagle3 1/2"):
        _lossless(EvalConfig(check_lossless=True), results, drafters)
    assert _lossless(EvalConfig(temperature=0.7), results, drafters) == {}


def test_plot_is_a_png(tmp_path: Path) -> None:
    rows = {
        "target": metrics.summarize([_res([0, 0], [0, 0])], 4),
        "eagle3": metrics.summarize([_res([4, 0, 2], [4, 4, 4])], 4),
    }
    report.write_plot(rows, 4, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
