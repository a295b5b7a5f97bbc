"""serve-target against a real store (`specctl store up --detach`, real mooncake_master).

Two producers + a consumer, one producer killed with SIGKILL mid-run: every prompt still
arrives exactly once. SmolLM2 + chatterbot streams verified records. Bad input leaves the
store untouched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO, SPECCTL, run_cli
from tests.goldens.tiny_target import build_tiny_target

pytestmark = pytest.mark.integration


@contextmanager
def running_store(state_dir: Path, *flags: str) -> Iterator[str]:
    proc = run_cli("store", "up", "--detach", "--state-dir", str(state_dir), *flags, check=True)
    address = json.loads(proc.stdout)["address"]
    try:
        yield address
    finally:
        run_cli("store", "down", "--store", address, "--state-dir", str(state_dir))


def stats(store: str) -> dict:
    from specctl.store import Client

    with Client.connect(store, role="admin") as client:
        return client.stats()


def producer(store: str, *args: str) -> subprocess.Popen[str]:
    # one thread each: several processes share the cores, and spinning OpenMP threads of
    # oversubscribed processes slow a forward pass down ~10x
    return subprocess.Popen(
        [*SPECCTL, "serve-target", "--store", store, *args],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def consume(store: str, n: int, producers: list, on_record=None, timeout_s: float = 150) -> list:
    """Receive up to n records (CRC-checked by the client) and ack them, until every producer
    has exited and the queue stays empty; returns (id, producer, ids, mask, aux shape) each."""
    from specctl.store import Client

    got = []
    deadline = time.monotonic() + timeout_s
    with Client.connect(store, role="trainer") as client:
        while len(got) < n and time.monotonic() < deadline:
            done = all(p.poll() is not None for p in producers)
            r = client.next_record(timeout_s=3)
            if r is None:
                if done:
                    break
                continue
            d = r.descriptor
            got.append(
                (
                    (d.epoch, d.index),
                    d.producer,
                    r.record.input_ids.tolist(),
                    r.record.loss_mask.tolist(),
                    tuple(r.record.aux_hidden.shape),
                )
            )
            client.ack([r])
            if on_record is not None:
                on_record(d)
        extra = client.next_record(timeout_s=2)  # nothing more may come
        assert extra is None, extra and extra.descriptor
    return got


def test_two_producers_kill_one_every_prompt_exactly_once(tmp_path: Path) -> None:
    from specctl.target.data import load_prompts
    from specctl.target.models import load_tokenizer
    from specctl.target.template import tokenize_conversation

    model = build_tiny_target(tmp_path / "model")
    n = 120
    args = [
        "--model",
        str(model),
        "--data",
        "chatterbot",
        "--max-samples",
        str(n),
        "--set",
        "lease_size=2",
    ]
    with running_store(tmp_path / "state", "--capacity", "256MiB", "--lease-ttl", "2") as store:
        # bad input first: it must leave nothing in the store
        bad = run_cli("serve-target", "--store", store, *args, "--aux-layers", "99")
        assert bad.returncode == 1 and "out of range" in bad.stderr
        s = stats(store)
        assert (s["puts"], s["cursor"], s["inflight_records"]) == (0, 0, 0)

        victim, survivor = producer(store, *args), producer(store, *args)
        victim_id = None

        def kill_victim(desc) -> None:
            nonlocal victim_id
            if victim_id is None and desc.producer.endswith(f":{victim.pid}"):
                victim_id = desc.producer
                os.kill(victim.pid, signal.SIGKILL)

        try:
            got = consume(store, n, [victim, survivor], on_record=kill_victim)
            out, err = survivor.communicate(timeout=120)
        finally:
            for p in (victim, survivor):
                if p.poll() is None:
                    p.kill()
                p.communicate()
        assert victim.returncode == -signal.SIGKILL, "the victim finished before it was killed"
        assert survivor.returncode == 0, err[-3000:]
        counts = Counter(sid for sid, *_ in got)
        missing = sorted({(0, i) for i in range(n)} - set(counts))
        assert not missing, f"lost samples {missing}; survivor: {out.strip()}"  # every prompt ...
        assert set(counts.values()) == {1}  # ... exactly once
        assert {p for _, p, *_ in got} >= {victim_id}
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["records"] == sum(1 for _, p, *_ in got if p != victim_id)
        s = stats(store)
        assert (s["inflight_records"], s["inflight_bytes"], s["queued"]) == (0, 0, 0)
    # content: each record is the templated conversation of its prompt index
    tok = load_tokenizer(model)
    prompts = load_prompts("chatterbot")
    for (_e, i), _p, ids, mask, aux_shape in got:
        want = tokenize_conversation(tok, prompts[i].messages)
        assert (ids, mask) == (want.input_ids, want.loss_mask)
        assert aux_shape == (len(ids), 3 * 64)


def test_smollm2_chatterbot_streams_verified_records(tmp_path: Path) -> None:
    from specctl import precision
    from specctl.target.data import load_prompts
    from specctl.target.models import load_tokenizer, resolve_model
    from specctl.target.template import tokenize_conversation

    with running_store(tmp_path / "state", "--capacity", "256MiB") as store:
        p = producer(store, "--model", "smollm2-135m", "--data", "chatterbot", "--max-samples", "3")
        got = consume(store, 3, [p])
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["records"] == 3 and summary["hidden_size"] == 576
    assert summary["aux_layers"] == [1, 14, 26] and summary["tokens_per_s"] > 0
    # --precision auto (the default) timed both dtypes on the real model and says which won
    prec = summary["precision"]
    faster = "bf16" if prec["bf16_ms"] < precision.MARGIN * prec["fp32_ms"] else "fp32"
    assert prec["dtype"] == faster, prec
    tok = load_tokenizer(resolve_model("smollm2-135m"))
    prompts = load_prompts("chatterbot")
    assert sorted(sid for sid, *_ in got) == [(0, 0), (0, 1), (0, 2)]
    for (_e, i), _p, ids, mask, aux_shape in got:
        want = tokenize_conversation(tok, prompts[i].messages)
        assert (ids, mask) == (want.input_ids, want.loss_mask)
        assert aux_shape == (len(ids), 3 * 576)
