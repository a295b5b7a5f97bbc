"""Checkpoints: atomic directories, `latest` and `best` links, exact-resume state.

Layout of `OUT/checkpoints/step-NNNNNNNN/`:
  draft.safetensors    every draft parameter and buffer (SGLang names, d2t/t2d included)
  optimizer.pt         full (unsharded) AdamW state + LR scheduler state (torch.save)
  rng-rank{r}.pt       each rank's torch RNG state
  trainer_state.json   step, data pass, trained sample ids, held-out ids seen, metrics
  vocab.safetensors    the draft vocab mapping
  config.json          the resolved run config
A checkpoint is written into a temporary directory and renamed into place; `OUT/latest`
and `OUT/best` are symlinks swapped with `os.replace`, so a crash never leaves a half
checkpoint behind a link. Older checkpoints that neither link names are deleted.

The trained-id set is the durable exactly-once truth: resume skips (dir mode) or
re-produces (store mode, `requeue_untrained`) exactly the samples not in it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from specctl.errors import CheckpointError

SampleId = tuple[int, int]
FILES = (
    "draft.safetensors",
    "optimizer.pt",
    "trainer_state.json",
    "vocab.safetensors",
    "config.json",
)


@dataclass
class TrainerState:
    step: int = 0
    data_pass: int = 0
    trained: set[SampleId] = field(default_factory=set)  # in the current data pass
    heldout_seen: set[SampleId] = field(default_factory=set)  # consumed but never trained
    samples: int = 0
    replayed: int = 0  # replayed samples (replay.py), not in `samples`
    tokens: int = 0
    best_al: float = 0.0
    best_step: int = 0
    evals_since_best: int = 0  # early stopping (--patience)
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "data_pass": self.data_pass,
            "samples": self.samples,
            "replayed": self.replayed,
            "tokens": self.tokens,
            "best_al": self.best_al,
            "best_step": self.best_step,
            "evals_since_best": self.evals_since_best,
            "metrics": self.metrics,
            "trained": sorted([list(s) for s in self.trained]),
            "heldout_seen": sorted([list(s) for s in self.heldout_seen]),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainerState:
        return cls(
            step=d["step"],
            data_pass=d["data_pass"],
            samples=d["samples"],
            replayed=d.get("replayed", 0),
            tokens=d["tokens"],
            best_al=d["best_al"],
            best_step=d.get("best_step", 0),
            evals_since_best=d.get("evals_since_best", 0),
            metrics=d["metrics"],
            trained={(e, i) for e, i in d["trained"]},
            heldout_seen={(e, i) for e, i in d["heldout_seen"]},
        )


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def write_checkpoint(
    out: Path,
    state: TrainerState,
    model_sd: dict[str, torch.Tensor],
    optim_sd: dict,
    config_path: Path,
    vocab_path: Path,
    best: bool,
) -> Path:
    """Rank 0: write everything except per-rank RNG (see `write_rng`) and flip the links."""
    from safetensors.torch import save_file

    final = checkpoint_dir(out, state.step)
    tmp = final.parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_unshared(model_sd), str(tmp / "draft.safetensors"))
    torch.save(optim_sd, tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state.to_json()) + "\n")
    shutil.copyfile(config_path, tmp / "config.json")
    shutil.copyfile(vocab_path, tmp / "vocab.safetensors")
    for rng in final.parent.glob(f".rng-{final.name}-rank*.pt"):  # written by every rank
        os.replace(rng, tmp / ("rng-" + rng.name.split(f"{final.name}-", 1)[1]))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _link(out / "latest", final)
    if best:
        _link(out / "best", final)
    _prune(out)
    return final


def _unshared(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory: tied weights (MLP speculator tie_weights)
    are written once per name, as copies (serving loaders read every slot name)."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        v = v.contiguous()
        if v.data_ptr() in seen:
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    return out


def write_rng(out: Path, step: int, rank: int) -> None:
    """Every rank, before rank 0's `write_checkpoint` (a barrier in between)."""
    d = checkpoint_dir(out, step).parent
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".rng-tmp-{step}-{rank}.pt"
    torch.save(
        {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        tmp,
    )
    os.replace(tmp, d / f".rng-{checkpoint_dir(out, step).name}-rank{rank}.pt")


def read_checkpoint(out: Path) -> tuple[Path, TrainerState]:
    link = out / "latest"
    if not link.exists():
        raise CheckpointError(
            f"--resume: no checkpoint in {out} (no 'latest')", "drop --resume to start a new run"
        )
    ckpt = link.resolve()
    missing = [f for f in FILES if not (ckpt / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: missing {', '.join(missing)}")
    state = TrainerState.from_json(json.loads((ckpt / "trainer_state.json").read_text()))
    return ckpt, state


def init_checkpoint(cfg: Any) -> Path:
    """--init-from PATH -> a checkpoint dir: PATH itself, or a run dir's `best` (else `latest`).

    A warm start (the second phase of a recipe) takes draft weights only: the optimizer,
    scheduler, step counter and trained ids start fresh. The family must match.
    """
    path = Path(str(cfg.init_from))
    if not (path / "draft.safetensors").is_file():
        path = next((path / n for n in ("best", "latest") if (path / n).exists()), path).resolve()
    if not (path / "draft.safetensors").is_file() or not (path / "config.json").is_file():
        raise CheckpointError(
            f"--init-from {cfg.init_from}: no train-draft checkpoint there",
            "pass a run dir (its best/latest) or a checkpoints/step-N dir",
        )
    family = json.loads((path / "config.json").read_text()).get("draft_family", "eagle3")
    if family != cfg.draft_family:
        raise CheckpointError(
            f"--init-from {path} holds a {family} draft, this run trains {cfg.draft_family}",
            f"add --draft {family} or start from a {cfg.draft_family} checkpoint",
        )
    return path


def load_init_weights(ckpt: Path, model: Any) -> None:
    """Every rank: the checkpoint's draft weights into the (sharded) model, strictly."""
    from safetensors.torch import load_file

    from specctl.train import parallel

    sd = {f"draft.{k}": v for k, v in load_file(str(ckpt / "draft.safetensors")).items()}
    try:
        parallel.load_full_state_dict(model, sd)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"--init-from {ckpt}: its weights do not fit this draft: {str(e).splitlines()[0]}",
            "use the same draft settings as that run (see its config.json)",
        ) from None


def restore_rng(ckpt: Path, rank: int) -> None:
    f = ckpt / f"rng-rank{rank}.pt"
    if f.is_file():
        rng = torch.load(f, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])


def _link(link: Path, target: Path) -> None:
    tmp = link.parent / f".{link.name}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target.relative_to(link.parent))
    os.replace(tmp, link)


def _prune(out: Path) -> None:
    keep = {p.resolve() for p in (out / "latest", out / "best") if p.exists()}
    for d in (out / "checkpoints").glob("step-*"):
        if d.resolve() not in keep:
            shutil.rmtree(d, ignore_errors=True)
