"""Failure drill: user mistakes across all five commands give one `Error: ...` line, no traceback.

Each case runs the real CLI as a subprocess on a tiny random Llama. The checks: exit 2 for
usage errors and 1 otherwise, empty stdout, exactly one error line naming the bad input,
and no process left behind. Children are found by a tag in their environment (inherited by
every process a command starts: store daemon, mooncake_master, torchrun ranks), so the check
needs no psutil and ignores other people's stores on a shared box.

The cases run concurrently (three at a time) in one module fixture: most fail in about a
second, the few that wait on a dead store overlap with the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cli
from tests.goldens.tiny_target import CONVERSATIONS, build_tiny_target

pytestmark = pytest.mark.integration

TAG_VAR = "SPECCTL_DRILL_TAG"


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # `{name}` placeholders are filled from the `world` fixture
    code: int  # expected exit status: 2 usage, 1 otherwise
    match: str  # must appear in the error
    typer: bool = False  # rejected by the flag parser itself (still one `Error:` line)
    xfail: str | None = None  # a known gap in a command this file does not own
    timeout: float = 60


def _c(id: str, cmd: str, code: int, match: str, **kw: Any) -> Case:
    return Case(id, tuple(cmd.split()), code, match, **kw)


CASES = [
    # store up / status / down
    _c("store-port-in-use", "store up --port {busy} --detach --state-dir {state}", 2, "in use"),
    _c("store-bad-capacity", "store up --capacity lots --state-dir {state}", 2, "bad size"),
    _c("store-remote-host", "store up --host 10.1.2.3 --detach --state-dir {state}", 2, "loopback"),
    _c("store-negative-port", "store up --port -5 --state-dir {state}", 2, "port"),
    _c(
        "store-negative-lease-ttl",
        "store up --lease-ttl -1 --detach --state-dir {state}",
        2,
        "--lease-ttl",
    ),
    _c(
        "store-unwritable-state-dir",
        "store up --detach --state-dir {afile}/state",
        1,
        "state",
    ),
    _c("store-status-unreachable", "store status --store 127.0.0.1:{dead}", 1, "no specctl store"),
    _c("store-status-bad-address", "store status --store bogus", 2, "malformed store address"),
    _c("store-down-unreachable", "store down --store 127.0.0.1:{dead}", 1, "no store answers"),
    _c("store-unknown-subcommand", "store nope", 2, "No such command", typer=True),
    # serve-target
    _c(
        "serve-missing-data",
        "serve-target --model {target} --data {root}/no.jsonl --to-dir {root}/r0",
        1,
        "not found",
    ),
    _c(
        "serve-malformed-jsonl",
        "serve-target --model {target} --data {bad} --to-dir {root}/r1",
        1,
        "line 2 is not valid JSON",
    ),
    _c(
        "serve-no-usable-turns",
        "serve-target --model {target} --data {questions} --to-dir {root}/r2",
        1,
        "no usable turns",
    ),
    _c(
        "serve-unknown-model",
        "serve-target --model {root}/no-model --data {chats} --to-dir {root}/r3",
        1,
        "unknown model",
    ),
    _c(
        "serve-unknown-engine",
        "serve-target --model {target} --data {chats} --engine vllmx --to-dir {root}/r4",
        2,
        "engine",
    ),
    _c("serve-bad-aux-layers", "serve-target --aux-layers 1,x --to-dir {root}/r5", 2, "aux-layers"),
    _c("serve-bad-set-key", "serve-target --set nope.x=1 --to-dir {root}/r6", 2, "'nope'"),
    _c("serve-bad-dtype", "serve-target --dtype fp8 --to-dir {root}/r7", 2, "--dtype"),
    _c(
        "serve-bad-precision", "serve-target --precision fp16 --to-dir {root}/r7b", 2, "--precision"
    ),
    _c(
        "serve-negative-count",
        "serve-target --data {chats} --max-samples -3 --to-dir {root}/r8",
        2,
        "--max-samples",
    ),
    _c("serve-missing-config", "serve-target --config {root}/no.yaml", 2, "config file not found"),
    _c(
        "serve-unwritable-to-dir",
        "serve-target --model {target} --data {chats} --to-dir {afile}/recs",
        1,
        "not writable",
    ),
    _c(
        "serve-bad-store-address",
        "serve-target --data {chats} --store localhost:99999",
        2,
        "malformed store address",
    ),
    _c(
        "serve-store-unreachable",
        "serve-target --model {target} --data {chats} --store 127.0.0.1:{dead}",
        1,
        "no specctl store answers",
    ),
    _c(
        "serve-store-not-a-store",  # something listens but never answers the handshake
        "serve-target --model {target} --data {chats} --store 127.0.0.1:{busy}",
        1,
        "never answered",
        timeout=30,
    ),
    _c("serve-non-integer", "serve-target --epochs two", 2, "Invalid value", typer=True),
    # train-draft
    _c(
        "train-missing-from-dir",
        "train-draft --target {target} --out {root}/t1 --from-dir {root}/no-recs",
        1,
        "no *.rec",
    ),
    _c(
        "train-records-mismatch-target",
        "train-draft --target {target} --out {root}/t2 --from-dir {recs4}",
        1,
        "same model",
    ),
    _c(
        "train-store-and-from-dir",
        "train-draft --target {target} --out {root}/t3 --from-dir {recs} --store 127.0.0.1:{dead}",
        2,
        "not both",
    ),
    _c(
        "train-bad-precision",
        "train-draft --target {target} --out {root}/t4 --precision fp8",
        2,
        "precision",
    ),
    _c(
        "train-zero-batch",
        "train-draft --target {target} --out {root}/t5 --from-dir {recs} --batch-size 0",
        2,
        "batch-size",
    ),
    _c(
        "train-negative-steps",
        "train-draft --target {target} --out {root}/t6 --from-dir {recs} --max-steps -1",
        2,
        "max-steps",
    ),
    _c("train-missing-flag", "train-draft --out {root}/t7", 2, "Missing option", typer=True),
    # eval-accept
    _c(
        "eval-aux-mismatch",
        "eval-accept --model {target4} --draft {ckpt} --data {chats} --out {root}/e2",
        1,
        "aux states",
    ),
    _c(
        "eval-negative-prompts",
        "eval-accept --draft {ckpt} --max-prompts -1 --out {root}/e4",
        2,
        "--max-prompts",
    ),
    _c(
        "eval-unwritable-out",
        "eval-accept --model {target} --draft {ckpt} --out {afile}/report",
        1,
        "report directory",
    ),
    _c("eval-non-integer-k", "eval-accept --k x", 2, "Invalid value", typer=True),
    # export
    _c("export-missing-src", "export {root}/no-ckpt {root}/x1", 1, "not a draft directory"),
    _c("export-leftover-key", "export {leftover} {root}/x2", 1, "unexpected extra.weight"),
    _c("export-unwritable-out", "export {ckpt} {afile}/served", 1, "cannot create"),
    _c("export-negative-k", "export {ckpt} {root}/x4 --to speculators --k -2", 2, "--k"),
    _c("export-missing-argument", "export {ckpt}", 2, "Missing argument", typer=True),
]


def _random_draft(target: Path, out: Path) -> Path:
    """A random EAGLE-3 draft for `target` (no embeddings: they come from the target)."""
    import torch

    from specctl.draft.eagle3 import Eagle3Config, Eagle3Draft
    from specctl.draft.vocab import build_mapping
    from specctl.export.io import write_dir

    cfg = Eagle3Config.from_target_config(
        json.loads((target / "config.json").read_text()), draft_vocab_size=64
    )
    torch.manual_seed(0)
    draft = Eagle3Draft(cfg)
    m = build_mapping(torch.randint(0, 100, (cfg.vocab_size,)), 64)
    draft.set_vocab(m.d2t, m.t2d)
    write_dir(out, cfg.to_dict(), {k: v for k, v in draft.state_dict().items() if "embed" not in k})
    return out


def _records(target: Path, chats: Path, out: Path) -> Path:
    from specctl.target.producer import ServeTargetConfig, run

    run(ServeTargetConfig(model=str(target), data=str(chats), to_dir=out, threads=1), None)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Every input the cases name: good ones to combine with a bad one, and the bad ones."""
    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("bad_input")
    target = build_tiny_target(root / "target")  # 8 layers: default aux layers 1, 3, 4
    target4 = build_tiny_target(root / "target4", num_layers=4)  # 2 distinct aux layers
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS[:2]))
    bad = root / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + '\n{"messages": [ broken\n')
    questions = root / "questions.jsonl"
    questions.write_text(json.dumps({"turns": ["a question, no answer"]}) + "\n")
    ckpt = _random_draft(target, root / "ckpt")
    leftover = root / "leftover"  # a checkpoint with one key no engine knows
    shutil.copytree(ckpt, leftover)
    state = load_file(leftover / "model.safetensors")
    save_file({**state, "extra.weight": torch.zeros(2)}, str(leftover / "model.safetensors"))
    afile = root / "a-file"  # a regular file: nothing can be created below it, even as root
    afile.write_text("x")
    busy = socket.socket()  # a port someone listens on (but that never answers)
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    paths = dict(root=root, target=target, target4=target4, chats=chats, bad=bad, ckpt=ckpt)
    paths |= dict(questions=questions, leftover=leftover, afile=afile, state=root / "state")
    paths["recs"] = _records(target, chats, root / "recs")
    paths["recs4"] = _records(target4, chats, root / "recs4")  # H=64 but 2 aux layers
    yield (
        {k: str(v) for k, v in paths.items()}
        | {"busy": str(busy.getsockname()[1])}
        | {"dead": str(dead)}
    )
    busy.close()


def _tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment carries `tag` (zombies have an empty environ)."""
    needle = f"{TAG_VAR}={tag}".encode()
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                environ = Path(f"/proc/{name}/environ").read_bytes()
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                pids.append(int(name))
    return pids


def _run_case(case: Case, world: dict[str, str]) -> dict[str, Any]:
    args = [a.format(**world) for a in case.args]
    env = {"OMP_NUM_THREADS": "1", TAG_VAR: case.id, "SPECCTL_DEBUG": "0"}
    try:
        proc = run_cli(*args, env=env, timeout=case.timeout)
        out: dict[str, Any] = {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
    except subprocess.TimeoutExpired:
        out = {"rc": None, "stdout": "", "stderr": f"timed out after {case.timeout}s"}
    orphans = _tagged_pids(case.id)
    for pid in orphans:  # clean up what this case started, then report it
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return out | {"orphans": orphans}


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, world: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Run the selected cases three at a time (most are quick; dead-store waits overlap)."""
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if isinstance(item, pytest.Function)
        and item.module is request.module
        and hasattr(item, "callspec")
    ]
    with ThreadPoolExecutor(max_workers=3) as pool:
        done = pool.map(lambda c: (c.id, _run_case(c, world)), selected)
        return dict(done)


def _params() -> list[Any]:
    return [
        pytest.param(
            c,
            id=c.id,
            marks=[pytest.mark.xfail(strict=False, reason=c.xfail)] if c.xfail else [],
        )
        for c in CASES
    ]


@pytest.mark.parametrize("case", _params())
def test_bad_input_gives_one_line_error(case: Case, outcomes: dict[str, dict[str, Any]]) -> None:
    out = outcomes[case.id]
    stderr = out["stderr"]
    report = f"rc={out['rc']}\nstdout={out['stdout']!r}\nstderr:\n{stderr[-2000:]}"
    assert out["rc"] == case.code, report
    assert out["stdout"] == "", report
    assert "Traceback" not in stderr, report
    assert not out["orphans"], f"left running: {out['orphans']}\n{report}"
    errors = [ln for ln in stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, report
    assert case.match in errors[0], report
    assert "internal error" not in errors[0], report


def test_cases_cover_twenty_kinds_across_all_commands() -> None:
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids)
    firsts = {c.args[0] for c in CASES}
    assert firsts == {"store", "serve-target", "train-draft", "eval-accept", "export"}
    assert sum(c.xfail is None for c in CASES) >= 20
