"""Batched regeneration on the tiny target, and `serve-target` mixing two sources."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from specctl.pack import unpack_record
from specctl.target.engines import SamplingParams
from specctl.target.engines.hf import HFEngine
from specctl.target.generate import GenStats, Job, regenerate
from specctl.target.template import encode_text, render
from tests.conftest import run_cli
from tests.goldens.tiny_target import CONVERSATIONS, build_tiny_target, one_torch_thread

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)
pytestmark = pytest.mark.integration
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_target(tmp_path_factory.mktemp("tiny") / "model")


def test_batched_regeneration_matches_batch_one(tiny: Path) -> None:
    """Left padding + KV cache + finished rows leaving the batch: same greedy text as alone."""
    eng = HFEngine(tiny, device="cpu")
    firsts = [
        encode_text(eng.tokenizer, render(eng.tokenizer, c[:1], add_generation_prompt=True))
        for c in CONVERSATIONS
    ]
    # make one row stop early: a token it emits greedily becomes a stop token
    alone = [eng.generate([p], GREEDY, [0])[0] for p in firsts]
    eng.stop_ids = set(eng.stop_ids) | {alone[0][2]}
    lens = [len(g) for g in eng.generate(firsts, GREEDY, [0, 1, 2])]
    assert min(lens) < GREEDY.max_new_tokens == max(lens), lens  # rows really finish apart
    jobs = [Job([dict(m) for m in c], seed=3) for c in CONVERSATIONS]
    stats = GenStats()
    regenerate(eng, jobs, GREEDY, stats)  # 3 conversations at once, 2 rounds (multi-turn)
    for conv, job in zip(CONVERSATIONS, jobs, strict=True):
        one = [Job([dict(m) for m in conv], seed=3)]
        regenerate(eng, one, GREEDY)
        assert one[0].messages == job.messages
    assert sum(m["role"] == "assistant" for j in jobs for m in j.messages) == 4
    assert stats.tokens > 0 and stats.seconds > 0


def test_serve_target_mixes_chatterbot_and_self_prompts(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "recs"
    proc = run_cli(
        "serve-target",
        "--model", str(tiny),
        "--data", "chatterbot:1,self:1",
        "--to-dir", str(out),
        "--max-samples", "10",
        "--max-new-tokens", "6",
        "--temperature", "1.0",
        "--dtype", "fp32",
        "--set", "lease_size=5",
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    # chatterbot has 2,026 usable rows: the weighted epoch is 4,052 slots, half of them self
    assert s["num_prompts"] == 4052
    assert set(s["sources"]) == {"chatterbot", "self"} and all(s["sources"].values())
    assert sum(s["sources"].values()) == s["records"] == 10 - s["duplicates_dropped"]
    assert s["regenerated_tokens"] > 0 and s["regen_tokens_per_s"] > 0
    recs = sorted(out.glob("*.rec"))
    assert len(recs) == s["records"]
    for path in recs:
        rec = unpack_record(path.read_bytes(), verify=True)
        assert f"{rec.epoch}_{rec.index}.rec" == path.name and rec.loss_mask.sum() > 0
    # an endless run into a folder is refused before loading anything
    proc = run_cli(
        "serve-target", "--model", str(tiny), "--data", "self:1", "--epochs", "0",
        "--to-dir", str(tmp_path / "never"),
    )  # fmt: skip
    assert proc.returncode == 2 and "--max-samples" in proc.stderr
    assert not (tmp_path / "never").exists()


def _endless_producer(store: str, tiny: Path, lease_size: int):
    """serve-target --epochs 0 on the tiny target: fresh samples until the run is over."""
    from tests.integration.test_serve_target_store import producer

    return producer(
        store, "--model", str(tiny), "--data", "chatterbot:1,self:1", "--epochs", "0",
        "--temperature", "1.0", "--max-new-tokens", "4", "--set", f"lease_size={lease_size}",
    )  # fmt: skip


def test_endless_producer_stops_when_the_trainer_leaves(tiny: Path, tmp_path: Path) -> None:
    """`--epochs 0`: fresh samples until the only trainer closes its client cleanly."""
    from specctl.store import Client
    from tests.integration.test_serve_target_store import running_store

    with running_store(tmp_path / "state", "--capacity", "64MiB") as store:
        proc = _endless_producer(store, tiny, lease_size=2)
        try:
            with Client.connect(store, role="trainer") as trainer:
                got = []
                deadline = time.monotonic() + 90
                while len(got) < 4 and time.monotonic() < deadline:
                    if (r := trainer.next_record(timeout_s=2)) is not None:
                        got.append((r.descriptor.epoch, r.descriptor.index))
                        trainer.ack([r])
            assert len(set(got)) == 4, got
            out, err = proc.communicate(timeout=60)  # the trainer left: the producer ends
        finally:
            proc.kill()
        assert proc.returncode == 0, err[-3000:]
        s = json.loads(out.strip().splitlines()[-1])
        assert s["stopped"] == "trainer finished" and s["records"] >= 4


def test_endless_producer_waiting_for_room_stops_when_the_trainer_leaves(
    tiny: Path, tmp_path: Path
) -> None:
    """A full store and no trainer left: the producer blocked on back-pressure gives up
    (`Client.wait_for_room`'s give_up) instead of waiting for room forever."""
    from specctl.store import Client
    from tests.integration.test_serve_target_store import running_store, stats

    with running_store(tmp_path / "state", "--capacity", "16MiB") as store:
        proc = _endless_producer(store, tiny, lease_size=16)
        try:
            with Client.connect(store, role="trainer") as trainer:
                assert trainer.next_record(timeout_s=60) is not None  # joined; acks nothing
                full = stats(store)["high_wm"] - 2**16  # above it the next put waits
                deadline = time.monotonic() + 150
                while stats(store)["inflight_bytes"] < full and time.monotonic() < deadline:
                    time.sleep(0.5)
            out, err = proc.communicate(timeout=60)  # the trainer left: the producer ends
        finally:
            proc.kill()
        assert proc.returncode == 0, err[-3000:]
        s = json.loads(out.strip().splitlines()[-1])
        assert s["stopped"] == "trainer finished", s
        st = stats(store)
        assert st["inflight_bytes"] > st["low_wm"]  # it stopped while waiting for room
