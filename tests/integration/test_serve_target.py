"""`specctl serve-target` as a real subprocess, offline mode (`--to-dir`) and bad input."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from specctl.pack import unpack_record
from specctl.target.engines.hf import HFEngine
from specctl.target.template import tokenize_conversation
from tests.conftest import run_cli as _run_cli
from tests.goldens.tiny_target import CONVERSATIONS, build_tiny_target, one_torch_thread

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)
pytestmark = pytest.mark.integration


def run_cli(*args: str, **kw):
    return _run_cli(*args, env={"OMP_NUM_THREADS": "1"}, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_target(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    rows = [{"messages": c} for c in CONVERSATIONS[:2]] * 3  # 6 prompts with answers
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _summary(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # stdout carries only the summary
    return json.loads(lines[0])


def test_to_dir_records_are_correct_and_a_rerun_resumes(
    tiny: Path, chats: Path, tmp_path: Path
) -> None:
    out = tmp_path / "recs"
    s = _summary(
        run_cli(
            "serve-target",
            "--model",
            str(tiny),
            "--data",
            str(chats),
            "--to-dir",
            str(out),
            "--epochs",
            "2",
            "--dtype",
            "fp32",
            "--precision",
            "fp32",  # records are compared with an fp32 in-process capture below
        )
    )
    assert s["records"] == 12 and s["num_prompts"] == 6 and s["aux_layers"] == [1, 3, 4]
    names = sorted(p.name for p in out.glob("*.rec"))
    assert names == sorted(f"{e}_{i}.rec" for e in range(2) for i in range(6))
    assert not list(out.glob(".*tmp*"))
    # every record: the right sample, CRCs checked, states equal an in-process capture
    eng = HFEngine(tiny, device="cpu")
    for e in range(2):
        for i in range(6):
            rec = unpack_record((out / f"{e}_{i}.rec").read_bytes(), verify=True)
            assert (rec.epoch, rec.index) == (e, i)
            want = tokenize_conversation(eng.tokenizer, CONVERSATIONS[i % 2])
            assert rec.input_ids.tolist() == want.input_ids
            assert rec.loss_mask.tolist() == want.loss_mask
            got = eng.capture([want])[0]
            torch.testing.assert_close(
                rec.aux_hidden, torch.cat(got.aux, dim=1), rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(rec.last_hidden, got.last, rtol=1e-5, atol=1e-5)
    # a rerun with one more epoch writes only the missing epoch
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.rec")}
    s = _summary(
        run_cli(
            "serve-target",
            "--model",
            str(tiny),
            "--data",
            str(chats),
            "--to-dir",
            str(out),
            "--epochs",
            "3",
            "--dtype",
            "fp32",
        )
    )
    assert s["records"] == 6
    assert all((out / n).stat().st_mtime_ns == t for n, t in before.items())
    assert len(list(out.glob("*.rec"))) == 18


def _one_line_error(proc, match: str) -> None:
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and match in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_bad_input_is_one_line_and_writes_nothing(tiny: Path, chats: Path, tmp_path: Path) -> None:
    out = tmp_path / "recs"
    _one_line_error(
        run_cli(
            "serve-target",
            "--model",
            str(tmp_path / "no-model"),
            "--data",
            str(chats),
            "--to-dir",
            str(out),
        ),
        "unknown model",
    )
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"turns": ["a question, no answer"]}) + "\n")
    _one_line_error(
        run_cli(
            "serve-target", "--model", str(tiny), "--data", str(questions), "--to-dir", str(out)
        ),
        "no usable turns",
    )
    _one_line_error(
        run_cli(
            "serve-target",
            "--model",
            str(tiny),
            "--data",
            str(chats),
            "--aux-layers",
            "1,8",
            "--to-dir",
            str(out),
        ),
        "out of range",
    )
    assert not out.exists()
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_cli(
        "serve-target",
        "--model",
        str(tiny),
        "--data",
        str(chats),
        "--store",
        f"127.0.0.1:{port}",
        timeout=60,
    )
    _one_line_error(proc, f"no specctl store answers at 127.0.0.1:{port}")
