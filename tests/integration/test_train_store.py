"""`specctl train-draft --store` against a real store (mooncake_master + control plane).

A producer in this process puts records made by a real tiny target; the trainer runs as a
subprocess. Checks: every sample is trained or held out exactly once, everything is acked,
a killed trainer resumes and the samples it had not checkpointed are produced and trained
again, an empty store fails with one line after --max-wait.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from specctl.store import Client
from tests.conftest import REPO, SPECCTL, run_cli
from tests.integration.store_worker import running_store
from tests.integration.test_train_draft import ENV, _one_error
from tests.unit.test_train_data import make_records, make_target

pytestmark = pytest.mark.integration
N = 24


@pytest.fixture(scope="module")
def recs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("store_train")
    target = make_target(root / "target", position_wise=True)
    make_records(target, root / "recs", N, T=16)
    return target, root / "recs"


def produce(client: Client, recs: Path, until: subprocess.Popen | None = None) -> int:
    """Lease seqs and put the matching record files; with `until`, keep polling while it runs."""
    client.run_meta("num_prompts", str(N))
    put = 0
    while True:
        lease = client.lease_prompts(4, limit=N)
        if lease is None:
            if until is None or until.poll() is not None:
                return put
            time.sleep(0.2)
            continue
        for seq in lease.seqs:
            data = (recs / f"0_{seq}.rec").read_bytes()
            buf = client.buffer(len(data))
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            hdr_t = int.from_bytes(data[16:20], "little")
            if client.put_record(buf, epoch=0, index=seq, T=hdr_t) is not None:
                put += 1
            lease.done(seq)


def args(target: Path, store: str, out: Path, *extra: str) -> list[str]:
    return [
        "train-draft",
        "--target",
        str(target),
        "--store",
        store,
        "--out",
        str(out),
        "--draft-vocab-size",
        "64",
        "--batch-size",
        "2",
        "--max-steps",
        "100",
        "--max-wait",
        "3",
        "--lr",
        "3e-3",
        "--set",
        "heldout=0.15",
        "--set",
        "draft.vocab_records=6",
        *extra,
    ]


def test_store_training_exactly_once_and_resume(recs: tuple[Path, Path], tmp_path: Path) -> None:
    target, rec_dir = recs
    with running_store(tmp_path / "store", "--capacity", "64MiB") as st:
        addr = st["address"]
        prod = Client.connect(addr, role="producer")
        assert produce(prod, rec_dir) == N
        # 1. a trainer killed after step 5 (checkpoint at 4) ...
        out = tmp_path / "run"
        killed = run_cli(
            *args(target, addr, out, "--set", "save_every=4"),
            env={**ENV, "SPECCTL_TEST_KILL_AT_STEP": "5"},
            timeout=300,
        )
        assert killed.returncode == -9, killed.stderr[-2000:]
        # 2. ... resumes: untrained samples go back to the producers and come again
        proc = subprocess.Popen(
            [*SPECCTL, *args(target, addr, out, "--resume")],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**__import__("os").environ, **ENV},
        )
        produce(prod, rec_dir, until=proc)
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        summary = json.loads(stdout)
        state = json.loads((out / "latest" / "trainer_state.json").read_text())
        trained = {tuple(x) for x in state["trained"]}
        held = {tuple(x) for x in state["heldout_seen"]}
        assert trained | held == {(0, i) for i in range(N)} and not trained & held
        assert state["samples"] == len(trained) == summary["samples"]  # each exactly once
        assert summary["replayed"] == 0  # replay is off by default
        assert len(list((out / "heldout").glob("*.rec"))) == len(held) > 0
        status = json.loads(run_cli("store", "status", "--store", addr, check=True).stdout)
        assert (status["inflight_bytes"], status["queued"], status["objects"]) == (0, 0, 0)
        prod.close()
        # 3. nothing left in the store: one line after --max-wait
        empty = run_cli(*args(target, addr, tmp_path / "empty", "--max-wait", "1"), env=ENV)
        assert empty.returncode == 1
        assert "no records arrived from the store within --max-wait 1s" in _one_error(empty.stderr)


@pytest.mark.parametrize("nproc", [1, 2])
def test_replay_trains_again_on_spooled_samples_without_counting_them(
    recs: tuple[Path, Path], tmp_path: Path, nproc: int
) -> None:
    """--set replay=1: once the store has no fresh record, a micro-batch with 2 fresh
    samples after it is trained once more; exactly-once bookkeeping is untouched."""
    target, rec_dir = recs
    with running_store(tmp_path / "store", "--capacity", "64MiB") as st:
        addr = st["address"]
        with Client.connect(addr, role="producer") as prod:
            assert produce(prod, rec_dir) == N
        out = tmp_path / "run"
        extra = ("--set", "replay=1", "--set", "replay_gap=2", "--max-wait", "2")
        proc = run_cli(*args(target, addr, out, *extra, "--nproc", str(nproc)), env=ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(proc.stdout)
        state = json.loads((out / "latest" / "trainer_state.json").read_text())
        trained = {tuple(x) for x in state["trained"]}
        held = {tuple(x) for x in state["heldout_seen"]}
        assert trained | held == {(0, i) for i in range(N)} and not trained & held
        assert state["samples"] == len(trained) == summary["samples"]
        assert summary["replayed"] == state["replayed"] < len(trained)
        if nproc == 1:  # all but the trailing micro-batches with < 2 fresh samples after
            assert summary["replayed"] >= len(trained) - 3  # them (gap - 1 + batch_size)
        else:  # the run ends when one rank has nothing: the other's replays may be left
            assert summary["replayed"] >= len(trained) // 2
