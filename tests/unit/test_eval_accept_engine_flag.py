"""`eval-accept --engine`: its one-line errors, checked before any model loads (main suite)."""

from __future__ import annotations

import sys

import pytest

from specctl.errors import InputError, UsageError
from specctl.evaluate.run import EvalConfig
from specctl.evaluate.specdec import DecodeResult
from specctl.evaluate.vllm_engine import check_config


@pytest.mark.unit
def test_vllm_missing_names_make_setup_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # find_spec -> None, import -> ImportError
    with pytest.raises(InputError) as e:
        check_config(EvalConfig(engine="vllm", draft="d", adaptive_threshold=0.0))
    assert "make setup-vllm" in str(e.value)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("cfg", "says"),
    [
        (EvalConfig(engine="sglang", draft="d"), "--engine must be hf or vllm"),
        (EvalConfig(engine="vllm"), "give --draft"),
        (EvalConfig(engine="vllm", draft="d", temperature=0.7), "--temperature 0"),
    ],
)
def test_bad_engine_flags_are_usage_errors(cfg: EvalConfig, says: str) -> None:
    with pytest.raises(UsageError) as e:
        check_config(cfg)
    assert says in str(e.value)


def _decode(tokens: int, rounds: list[tuple[int, int]]) -> DecodeResult:
    """rounds: (emitted, accepted) per verify round."""
    return DecodeResult(
        tokens=list(range(tokens)),
        prefill_s=0.0,
        total_s=1.0,
        emitted=[e for e, _ in rounds],
        accepted=[a for _, a in rounds],
        proposed=[4] * len(rounds),
    )


@pytest.mark.unit
@pytest.mark.parametrize(("vllm_rounds", "agree"), [(4, True), (6, False)])
def test_compare_flags_disagreement(
    vllm_rounds: int, agree: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    from specctl.evaluate import metrics
    from specctl.evaluate.vllm_engine import compare, log_comparison

    # specctl: 9 tokens = prefill token + 4 rounds emitting 3+2+2+1 (AL 2.0)
    ours = _decode(9, [(3, 2), (2, 1), (2, 1), (1, 0)])
    results = {"target": [_decode(9, [(1, 0)] * 8)], "eagle3": [ours]}
    rows = {"eagle3": metrics.summarize([ours], 4)}
    # vLLM: the same 9 tokens in `vllm_rounds` drafts (4 = same acceptance, 6 = worse)
    rows["vllm"] = {
        "acceptance_length": 8 / vllm_rounds,
        "acceptance_length_vllm": 2.0,
        "rounds": vllm_rounds,
        "tok_per_s": 1.0,
        "accept_rate": [0.5, 0.2, None, None],
    }
    cmp = compare(rows, results, [list(range(9))])
    assert cmp["al_specctl"] == 2.0 and cmp["al_specctl_counted_like_vllm"] == 2.0
    assert cmp["engine_agreement"] is agree and cmp["vllm_text_equals_target"] == "1/1"
    log_comparison(cmp, rows["vllm"])
    warned = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("WARNING")]
    assert len(warned) == (0 if agree else 1)
