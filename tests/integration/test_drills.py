"""Failure drills: real store, real serve-target and train-draft processes, a tiny random Llama.

(a) kill -9 a producer mid-run; (b) kill -9 the trainer and `--resume`; (c) restart the store
mid-run; (d) a corrupted record in the store. Each drill checks exactly-once training with the
trainer checkpoint's trained-id set: trained + held-out = every sample, disjoint, and the
sample counter equals the set size (a duplicate would make it larger).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, SPECCTL, run_cli
from tests.goldens.tiny_target import build_tiny_target

pytestmark = pytest.mark.integration
N = 24  # chatterbot prompts per drill
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_target(tmp_path_factory.mktemp("drills") / "model")


_spawned: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_orphans() -> Iterator[None]:
    """A failed drill must not leave producers or trainers running."""
    yield
    while _spawned:
        p = _spawned.pop()
        if p.poll() is None:
            p.kill()
            p.communicate()


@contextmanager
def store(state: Path, *flags: str) -> Iterator[str]:
    up = run_cli("store", "up", "--detach", "--state-dir", str(state), *flags, check=True)
    address = json.loads(up.stdout)["address"]
    try:
        yield address
    finally:
        run_cli("store", "down", "--store", address, "--state-dir", str(state))


def spawn(args: list[str], log: Path) -> subprocess.Popen[str]:
    """A specctl process; stderr to a file (polled by the drills), stdout piped (the summary)."""
    p = subprocess.Popen(
        [*SPECCTL, *args],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        env={**os.environ, **ENV},
    )
    p.stderr_log = str(log)  # type: ignore[attr-defined]
    _spawned.append(p)
    return p


def producer(addr: str, model: Path, log: Path, *extra: str) -> subprocess.Popen[str]:
    return spawn(
        [
            "serve-target",
            "--store",
            addr,
            "--model",
            str(model),
            "--data",
            "chatterbot",
            "--max-samples",
            str(N),
            "--set",
            "lease_size=2",
            "--set",
            "threads=1",
            *extra,
        ],
        log,
    )


def trainer(addr: str, model: Path, out: Path, log: Path, *extra: str) -> subprocess.Popen[str]:
    return spawn(
        [
            "train-draft",
            "--store",
            addr,
            "--target",
            str(model),
            "--out",
            str(out),
            "--draft-vocab-size",
            "64",
            "--batch-size",
            "2",
            "--max-steps",
            "1000",
            "--max-wait",
            "15",
            "--lr",
            "3e-3",
            "--ttt-length",
            "2",
            "--set",
            "heldout=0.15",
            "--set",
            "draft.vocab_records=4",
            "--set",
            "save_every=2",
            "--set",
            "log_every=1",
            "--set",
            "eval_every=1000",
            *extra,
        ],
        log,
    )


def finish(p: subprocess.Popen[str], timeout: float = 180) -> dict[str, Any]:
    out, _ = p.communicate(timeout=timeout)
    log = Path(p.stderr_log)  # type: ignore[attr-defined]
    assert p.returncode == 0, f"{log.name}: exit {p.returncode}\n{log.read_text()[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stats(addr: str) -> dict[str, Any]:
    """Control-plane counters only: milliseconds, so polls see the run as it happens (a full
    Client also sets up Mooncake, ~1 s, in which a tiny-model producer can finish its work)."""
    from specctl.store import control as keys
    from specctl.store.address import parse
    from specctl.store.control import Control

    a = parse(addr)
    ctl = Control.connect(a.host, a.port, 10.0)
    return {**ctl.counters(), "queued": ctl.qlen(keys.RECORDS)}


def state(out: Path) -> dict[str, Any]:
    return json.loads((out / "latest" / "trainer_state.json").read_text())


def assert_exactly_once(out: Path, summary: dict[str, Any]) -> set[tuple[int, int]]:
    s = state(out)
    trained = {(e, i) for e, i in s["trained"]}
    held = {(e, i) for e, i in s["heldout_seen"]}
    assert trained | held == {(0, i) for i in range(N)}, "lost samples"
    assert not trained & held
    assert s["samples"] == len(trained) == summary["samples"], "a sample was trained twice"
    return trained


def frozen(p: subprocess.Popen[str]) -> None:
    """SIGSTOP `p` so a drill can kill it at a known point, not whenever the kill lands."""
    p.send_signal(signal.SIGSTOP)
    assert p.poll() is None, "it finished before the drill could stop it"


def killed(p: subprocess.Popen[str]) -> None:
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL, "it finished before it was killed"


def one_error(log: Path) -> str:
    text = log.read_text()
    errors = [x for x in text.splitlines() if x.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in text, text[-2000:]
    return errors[0]


def test_kill_producer_mid_run_every_sample_trained_once(model: Path, tmp_path: Path) -> None:
    with store(tmp_path / "st", "--capacity", "128MiB", "--lease-ttl", "2") as addr:
        # 1. the victim alone until its first put, then frozen mid-lease (lease_size=2: it
        #    holds the sample after the one it put) with most of the run still to do
        victim = producer(addr, model, tmp_path / "victim.log")
        wait_for(lambda: stats(addr).get("puts", 0) >= 1, "the victim's first put")
        frozen(victim)
        assert stats(addr)["puts"] < N // 2, "the victim did most of the run before it froze"
        # 2. the survivor starts, then the victim dies; its lease expires (--lease-ttl 2) and
        #    goes to the survivor; the trainer starts last (a loaded machine may take longer
        #    than --max-wait to load a producer)
        survivor = producer(addr, model, tmp_path / "survivor.log")
        killed(victim)
        tr = trainer(addr, model, tmp_path / "run", tmp_path / "train.log")
        finish(survivor)
        summary = finish(tr)
        assert_exactly_once(tmp_path / "run", summary)
        s = stats(addr)
        assert (s["inflight_records"], s["queued"]) == (0, 0)


def test_kill_trainer_resume_exactly_once_loss_continues(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with store(tmp_path / "st", "--capacity", "128MiB") as addr:
        prod = producer(addr, model, tmp_path / "prod.log", "--regenerate", "--max-new-tokens", "8")
        wait_for(lambda: stats(addr).get("puts", 0) >= 1, "the first put")
        tr = trainer(addr, model, out, tmp_path / "train1.log")
        # 1. kill -9 after a checkpoint and at least one step past it
        ckpt = out / "latest" / "trainer_state.json"

        def past_checkpoint() -> bool:
            rows = metrics(out)
            return ckpt.exists() and bool(rows) and rows[-1]["step"] > state(out)["step"]

        wait_for(past_checkpoint, "a checkpoint and a step past it")
        frozen(tr)
        killed(tr)
        step0 = state(out)["step"]
        before = [r["step"] for r in metrics(out)]
        # 2. resume: untrained samples go back to the producers; the operator re-runs one
        finish(prod)
        log2 = tmp_path / "train2.log"
        tr = trainer(addr, model, out, log2, "--resume")
        wait_for(lambda: "resume:" in log2.read_text(), "the trainer's resume hand-back")
        finish(
            producer(addr, model, tmp_path / "prod2.log", "--regenerate", "--max-new-tokens", "8")
        )
        summary = finish(tr)
    assert_exactly_once(out, summary)
    after = [r["step"] for r in metrics(out)][len(before) :]
    assert after and after[0] == step0 + 1, (step0, before, after)  # the curve continues
    assert after == list(range(step0 + 1, step0 + 1 + len(after)))
    assert summary["steps"] == after[-1]


def test_store_restart_fails_fast_then_resumes_exactly_once(model: Path, tmp_path: Path) -> None:
    out, st = tmp_path / "run", tmp_path / "st"
    # 1. a run whose store goes away mid-run
    with store(st, "--capacity", "16MiB") as addr:
        prod = producer(
            addr, model, tmp_path / "prod1.log", "--regenerate", "--max-new-tokens", "16"
        )
        wait_for(lambda: stats(addr).get("puts", 0) >= 1, "the first put")
        tr = trainer(addr, model, out, tmp_path / "train1.log")
        wait_for(lambda: (out / "latest").exists(), "a first checkpoint")
        assert tr.poll() is None, "the trainer finished before the store went down"
        t0 = time.monotonic()
        run_cli("store", "down", "--store", addr, "--state-dir", str(st), check=True)
        # 2. the trainer (waiting for records) fails with one clear line within seconds, not
        #    after --max-wait or a TCP timeout; the producer too unless it had already finished
        tr.communicate(timeout=60)
        assert tr.returncode not in (0, None)
        assert "store" in one_error(tmp_path / "train1.log").lower()
        assert time.monotonic() - t0 < 60
        prod.communicate(timeout=60)
        if prod.returncode != 0:
            assert "store" in one_error(tmp_path / "prod1.log").lower()
    # 3. a new store; the trainer resumes from its checkpoint first, then the producer re-runs
    with store(st, "--capacity", "64MiB") as addr:
        log2 = tmp_path / "train2.log"
        tr = trainer(addr, model, out, log2, "--resume")
        wait_for(lambda: "resume:" in log2.read_text(), "the trainer's resume hand-back")
        prod = producer(
            addr, model, tmp_path / "prod2.log", "--regenerate", "--max-new-tokens", "16"
        )
        finish(prod)
        summary = finish(tr)
    assert_exactly_once(out, summary)


def test_corrupted_record_rejected_reproduced_trained_once(model: Path, tmp_path: Path) -> None:
    import torch

    from specctl.pack import pack_record, record_nbytes
    from specctl.store import Client

    out = tmp_path / "run"
    with store(tmp_path / "st", "--capacity", "128MiB") as addr:
        # 1. a producer client leases one seq and puts a record whose payload has a flipped
        #    byte under a valid descriptor (the CRC in the header no longer matches)
        with Client.connect(addr, role="producer") as c:
            c.run_meta("num_prompts", "2026")
            lease = c.lease_prompts(1, limit=N)
            assert lease is not None
            (seq,) = lease.seqs
            T = 12
            buf = c.buffer(record_nbytes(T, 64, 3, torch.bfloat16))
            pack_record(
                epoch=0,
                index=seq,
                input_ids=torch.arange(T, dtype=torch.int32) + 10,
                loss_mask=torch.ones(T, dtype=torch.uint8),
                aux_hidden=torch.randn(T, 3 * 64),
                last_hidden=torch.randn(T, 64),
                out=buf,
            )
            buf[buf.numel() - 7] ^= 0x10
            assert c.put_record(buf, epoch=0, index=seq, T=T) is not None
            lease.done(seq)
        # 2. the trainer rejects it (CRC), logs it and hands the sample back ...
        log = tmp_path / "train.log"
        tr = trainer(addr, model, out, log, "--max-wait", "40")  # covers the producer's start
        wait_for(lambda: stats(addr).get("corrupt", 0) >= 1, "the CRC rejection")
        # 3. ... and a producer re-produces it with the rest
        prod = producer(addr, model, tmp_path / "prod.log")
        finish(prod)
        summary = finish(tr)
    text = log.read_text()
    assert "bad record" in text and "CRC" in text.upper(), text[-2000:]
    trained = assert_exactly_once(out, summary)
    held = {(e, i) for e, i in state(out)["heldout_seen"]}
    assert (0, seq) in trained | held


def metrics(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if r.get("kind") == "train"]
