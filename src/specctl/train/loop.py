"""`train_draft(cfg)`: the training loop, the same on 1 rank and on N (torchrun).

Per optimizer step every rank: takes its prefetched micro-batches (data-wait measured),
agrees with the others that everyone has data (else all stop together), all-reduces the
per-step token counts (the loss denominators, so N ranks == 1 rank with the same global
batch), runs forward/backward per micro-batch, clips, steps AdamW and the LR schedule,
then acks the samples (store) and records their ids as trained. Every `eval_every` steps
the held-out slice gives a simulated acceptance length; `best` follows it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from specctl.config import save_config, to_dict
from specctl.console import Progress, log
from specctl.draft.mlp import MLPSpeculatorConfig
from specctl.train import parallel
from specctl.train.checkpoint import (
    TrainerState,
    init_checkpoint,
    load_init_weights,
    read_checkpoint,
    restore_rng,
    write_checkpoint,
    write_rng,
)
from specctl.train.data import Batch, Prefetcher
from specctl.train.metrics import MetricsLog
from specctl.train.mlp_setup import build_mlp_model, full_vocab
from specctl.train.objective import TTTResult, simulated_al, step_counts
from specctl.train.run_config import TrainDraftConfig
from specctl.train.setup import (
    TTTModel,
    as_result,
    build_model,
    build_optimizer,
    draft_config,
    prepare_out,
    resolve_vocab,
)
from specctl.train.sources import open_source


def train_draft(cfg: TrainDraftConfig) -> dict[str, Any]:
    """Train; returns the summary (rank 0's view; all ranks return it)."""
    env = parallel.init_distributed()
    try:
        return _run(cfg, env)
    finally:
        parallel.shutdown()


def _run(cfg: TrainDraftConfig, env: parallel.Dist) -> dict[str, Any]:
    from specctl.target.models import resolve_model

    out = prepare_out(cfg.out)
    target_dir = resolve_model(cfg.target)
    dcfg = draft_config(cfg, target_dir)
    ckpt, state = read_checkpoint(out) if cfg.resume else (None, TrainerState())
    if ckpt is not None:
        _check_same_shape(ckpt, cfg)
    source = open_source(cfg, env, dcfg, out, state)
    if cfg.eval_from:  # bad --eval-from fails now, not at the first eval
        _eval_batches(cfg, source.dims)
    try:
        init = init_checkpoint(cfg) if ckpt is None and cfg.init_from else None
        built: torch.nn.Module
        if isinstance(dcfg, MLPSpeculatorConfig):
            mapping = full_vocab(dcfg, env, out)
            built = build_mlp_model(dcfg, target_dir, cfg, env)
        else:  # --init-from keeps the warm start's vocab mapping, like --resume
            mapping = resolve_vocab(cfg, env, dcfg, source.first_samples, out, ckpt or init)
            built = build_model(dcfg, mapping, target_dir, cfg, env)
        model = parallel.parallelize(built, env, cfg.precision, cfg.compile)
        optim, sched = build_optimizer(model, cfg)
        if ckpt is not None:
            _restore(ckpt, model, optim, sched, env)
        elif init is not None:
            load_init_weights(init, model)
        if env.is_main:
            save_config(cfg, out / "config.json")
            log(
                f"draft {cfg.draft_family}: {mapping.draft_vocab_size} draft tokens "
                f"({_coverage_words(mapping)}), world {env.world}, start step {state.step}"
            )
        summary = _loop(cfg, env, out, model, optim, sched, state, source)
        summary.update(_vocab_summary(cfg, mapping, source.dims))
        summary["head_matmul"] = built.head.mm_info
        return summary
    finally:
        source.close()


def _coverage_words(mapping: Any) -> str:
    """In-sample coverage is 1.0 whenever the vocab outnumbers the distinct ids counted."""
    words = f"covers {mapping.coverage():.3f} of the counted tokens"
    held = mapping.info.get("vocab_coverage_split")
    return words if held is None else f"{words}, {held:.3f} of a held-out half"


def _vocab_summary(cfg: TrainDraftConfig, mapping: Any, dims: tuple[int, int]) -> dict[str, Any]:
    """Draft vocab size and coverage: of the counted tokens, and of --eval-from's (unseen)."""
    from specctl.draft.vocab import count_tokens, coverage_of
    from specctl.train.data import DirSource, read_record

    s: dict[str, Any] = {
        "draft_vocab_size": mapping.draft_vocab_size,
        "vocab_coverage": mapping.coverage(),
        **{k: v for k, v in mapping.info.items() if k != "vocab_candidates"},
    }
    if "vocab_candidates" in mapping.info:
        s["vocab_candidates"] = {
            int(r["size"]): [round(r["coverage"], 4), round(r["speedup"], 3)]
            for r in mapping.info["vocab_candidates"]
        }
    if cfg.eval_from:
        items = DirSource(Path(cfg.eval_from), *dims, 1.0, cfg.max_eval).heldout
        pairs = ((r.input_ids, r.loss_mask) for r in (read_record(f) for _, f in items))
        s["eval_from_coverage"] = coverage_of(mapping, count_tokens(pairs, mapping.vocab_size))
    return s


def _check_same_shape(ckpt: Path, cfg: TrainDraftConfig) -> None:
    """A resume must build the same draft: compare the shape-defining settings."""
    import json

    from specctl.errors import CheckpointError

    saved = json.loads((ckpt / "config.json").read_text())
    now = to_dict(cfg)
    keys = [
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "num_aux",
        "draft_vocab_size",
    ]
    if cfg.draft_family == "mlp":
        keys = ["inner_dim", "tie_weights", "scale_input"]
    diff = [k for k in keys if saved["draft"].get(k) != now["draft"][k]]
    diff += [
        k for k, d in (("draft_family", "eagle3"), ("n_predict", 3)) if saved.get(k, d) != now[k]
    ]
    if diff:
        raise CheckpointError(
            f"--resume: {ckpt} was trained with different {', '.join(diff)}",
            "resume with the run's own settings (see its config.json)",
        )


def _restore(ckpt: Path, model: Any, optim: Any, sched: Any, env: parallel.Dist) -> None:
    from safetensors.torch import load_file

    sd = {f"draft.{k}": v for k, v in load_file(str(ckpt / "draft.safetensors")).items()}
    parallel.load_full_state_dict(model, sd)
    saved = torch.load(ckpt / "optimizer.pt", weights_only=False)
    parallel.load_optimizer_state(model, optim, saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    restore_rng(ckpt, env.rank)


def _loop(
    cfg: TrainDraftConfig,
    env: parallel.Dist,
    out: Path,
    model: Any,
    optim: Any,
    sched: Any,
    state: TrainerState,
    source: Any,
) -> dict[str, Any]:
    metrics = MetricsLog(out, env.is_main)
    pf = Prefetcher(source.produce)
    t0 = time.monotonic()
    last: dict[str, float] = {}
    heldout_al = 0.0
    stopped_early = False
    start_step = state.step
    try:
        with Progress("train-draft", total=cfg.max_steps) if env.is_main else _Quiet() as prog:
            prog.done = state.step
            while state.step < cfg.max_steps:
                group: list[Batch] | None = pf.get()
                if not _all_have(group, env):
                    break
                source.on_step(group or [], state)
                last = _train_step(cfg, env, model, optim, sched, group or [], state)
                pf.ack([h for b in group or [] for h in b.handles])
                _maybe_die(state.step)
                elapsed = time.monotonic() - t0
                last.update(
                    samples_per_s=(state.samples - source.start_samples) / elapsed,
                    tokens_per_s=(state.tokens - source.start_tokens) / elapsed,
                    data_wait_pct=100.0 * pf.wait_s / elapsed,
                    lr=sched.get_last_lr()[0],
                )
                prog.update(
                    1,
                    loss=last["loss"],
                    acc_0=last["acc_0"],
                    al=last["sim_al"],
                    tok_s=last["tokens_per_s"],
                    wait_pct=last["data_wait_pct"],
                )
                if state.step % cfg.log_every == 0:
                    metrics.write("train", state.step, last)
                evaluate = state.step % cfg.eval_every == 0
                if evaluate or state.step % cfg.save_every == 0:
                    heldout_al = _eval_and_save(
                        cfg, env, out, model, optim, sched, state, source, metrics, heldout_al
                    )
                if cfg.patience and state.evals_since_best >= cfg.patience:
                    stopped_early = True
                    if env.is_main:
                        log(f"early stop at step {state.step}: {cfg.patience} evals, no gain")
                    break
        if state.step > start_step and state.step % cfg.save_every and state.step % cfg.eval_every:
            heldout_al = _eval_and_save(
                cfg,
                env,
                out,
                model,
                optim,
                sched,
                state,
                source,
                metrics,
                heldout_al,
                force_eval=True,
            )
    finally:
        pf.close()
        source.finish(pf)
        metrics.close()
    if state.step == 0:
        from specctl.errors import InputError

        raise InputError(
            "no training step ran: the data ended before one global batch",
            "give more records or a smaller --batch-size",
        )
    elapsed = time.monotonic() - t0
    return {
        "steps": state.step,
        "samples": state.samples,
        "replayed": state.replayed,  # later passes over trained samples (--set replay=N)
        "tokens": state.tokens,
        "loss": last.get("loss"),
        "acc_0": last.get("acc_0"),
        "sim_al": last.get("sim_al"),
        "heldout_al": heldout_al,
        "eval_al": state.metrics.get("eval_al"),  # --eval-from
        "best_al": state.best_al,
        "best_by": "eval_from" if cfg.eval_from else "heldout",
        "best_step": state.best_step,
        "stopped_early": stopped_early,
        "tokens_per_s": last.get("tokens_per_s"),
        "data_wait_pct": 100.0 * pf.wait_s / elapsed,
        "world": env.world,
        "out": str(out),
        "checkpoint": str((out / "latest").resolve()),
    }


class _Quiet:
    """Progress stand-in for ranks other than 0 (one progress display per run)."""

    done = 0

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int = 1, **fields: Any) -> None:
        pass


def _maybe_die(step: int) -> None:
    """Fault injection for the resume tests: SIGKILL ourselves after a given step."""
    import os
    import signal

    if os.environ.get("SPECCTL_TEST_KILL_AT_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def _all_have(group: list[Batch] | None, env: parallel.Dist) -> bool:
    flag = torch.tensor([1 if group else 0], device=env.device)
    return bool(parallel.all_reduce(flag, "min").item())


def _to(b: Batch, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(
        t.to(device, non_blocking=True) for t in (b.input_ids, b.loss_mask, b.aux, b.last_hidden)
    )


def _train_step(
    cfg: TrainDraftConfig,
    env: parallel.Dist,
    model: TTTModel,
    optim: Any,
    sched: Any,
    group: list[Batch],
    state: TrainerState,
) -> dict[str, float]:
    k = len(cfg.step_weights())  # TTT steps (eagle3) or heads (mlp)
    # Every rank runs the same number of forwards (FSDP collectives): pad with masked copies.
    n_micro = int(parallel.all_reduce(torch.tensor([len(group)], device=env.device), "max"))
    group = group + [_masked(group[-1])] * (n_micro - len(group))
    denom = sum(step_counts(b.loss_mask, k) for b in group).to(env.device)  # type: ignore[union-attr]
    # int64: mixed precision casts floating forward inputs to bf16 (exact only up to 256)
    denom = parallel.all_reduce(denom).round().long()
    sums = torch.zeros(4, k, device=env.device)  # loss_sum, hits, count, valid
    for m, b in enumerate(group):
        model.set_requires_gradient_sync(m == n_micro - 1)  # type: ignore[operator]
        r = as_result(model(*_to(b, env.device), denom))
        (r.loss * env.world).backward()  # FSDP averages over ranks; we want the sum
        sums += _sums(r, env.device)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip
    )
    optim.step()
    sched.step()
    optim.zero_grad(set_to_none=True)
    tokens = torch.tensor([float(sum(b.tokens for b in group if b.ids))], device=env.device)
    samples = torch.tensor([float(sum(len(b.ids) for b in group))], device=env.device)
    replayed = torch.tensor([float(sum(b.replayed for b in group))], device=env.device)
    parallel.all_reduce(sums)
    parallel.all_reduce(tokens)
    parallel.all_reduce(samples)
    parallel.all_reduce(replayed)
    for b in group:
        state.trained.update(b.ids)
    state.step += 1
    state.samples += int(samples.item())
    state.replayed += int(replayed.item())
    state.tokens += int(tokens.item())
    return _step_metrics(sums, grad_norm, cfg.step_weights())


def _masked(b: Batch) -> Batch:
    return Batch(b.input_ids, torch.zeros_like(b.loss_mask), b.aux, b.last_hidden, [], [])


def _sums(r: TTTResult, device: torch.device) -> torch.Tensor:
    """One forward's per-step [4, k] rows: loss_sum, hits, count, valid."""
    return torch.stack([r.loss_sum.float(), r.hits, r.count.to(device), r.valid.to(device)])


def _step_metrics(sums: torch.Tensor, grad_norm: Any, weights: list[float]) -> dict[str, float]:
    """`loss` weighs the steps as the objective does (`cfg.step_weights()`): the trained loss."""
    loss_sum, hits, count, valid = (s.cpu() for s in sums)
    count = count.clamp(min=1)
    acc = (hits / count).tolist()
    losses = (loss_sum / count).tolist()
    gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    m = {
        "loss": sum(w * x for w, x in zip(weights, losses, strict=True)),
        "sim_al": simulated_al(acc),
        "grad_norm": float(gn),
        "in_vocab": float(valid.sum() / count.sum()),
    }
    m.update({f"acc_{i}": a for i, a in enumerate(acc)})
    m.update({f"loss_{i}": x for i, x in enumerate(losses)})
    return m


@torch.no_grad()
def evaluate(
    cfg: TrainDraftConfig, env: parallel.Dist, model: TTTModel, batches: list[Batch]
) -> dict[str, float]:
    """Simulated AL on the held-out slice (every rank evaluates the same batches)."""
    k = len(cfg.step_weights())
    sums = torch.zeros(4, k, device=env.device)
    for b in batches:
        denom = step_counts(b.loss_mask, k).long().to(env.device)
        sums += _sums(as_result(model(*_to(b, env.device), denom)), env.device)
    m = _step_metrics(sums, torch.tensor(0.0), cfg.step_weights())
    m.pop("grad_norm")
    return m


def _eval_and_save(
    cfg: TrainDraftConfig,
    env: parallel.Dist,
    out: Path,
    model: Any,
    optim: Any,
    sched: Any,
    state: TrainerState,
    source: Any,
    metrics: MetricsLog,
    heldout_al: float,
    force_eval: bool = False,
) -> float:
    batches = source.heldout_batches()
    eval_now = force_eval or state.step % cfg.eval_every == 0
    if batches and eval_now:
        ev = evaluate(cfg, env, model, batches)
        heldout_al = ev["sim_al"]
        metrics.write("eval", state.step, ev)
        if env.is_main:
            log(
                f"[eval] step {state.step}: held-out sim AL {heldout_al:.3f} "
                f"acc_0 {ev['acc_0']:.3f} on {sum(len(b.ids) for b in batches)} samples"
            )
    eval_al = state.metrics.get("eval_al", 0.0)
    if cfg.eval_from and eval_now:
        eval_al = _eval_from(cfg, env, model, source.dims, state.step, metrics)
    score = eval_al if cfg.eval_from else heldout_al
    best = score > state.best_al or not (out / "best").exists()
    if best:
        state.best_al, state.best_step, state.evals_since_best = score, state.step, 0
    elif eval_now and (batches or cfg.eval_from):
        state.evals_since_best += 1
    state.metrics = {"heldout_al": heldout_al}
    if cfg.eval_from:
        state.metrics["eval_al"] = eval_al
    # each rank saw its own samples: the checkpoint holds the union
    state.trained = set().union(*parallel.all_gather_object(state.trained))
    state.heldout_seen = set().union(*parallel.all_gather_object(state.heldout_seen))
    model_sd = parallel.full_state_dict(model)
    optim_sd = parallel.full_optimizer_state(model, optim)
    write_rng(out, state.step, env.rank)
    parallel.barrier()
    if env.is_main:
        sd = {k.removeprefix("draft."): v for k, v in model_sd.items()}
        write_checkpoint(
            out,
            state,
            sd,
            {"optimizer": optim_sd, "scheduler": sched.state_dict()},
            out / "config.json",
            out / "vocab.safetensors",
            best,
        )
    parallel.barrier()
    return heldout_al


_EVAL_SETS: dict[tuple[Any, ...], list[Batch]] = {}


def _eval_from(
    cfg: TrainDraftConfig,
    env: parallel.Dist,
    model: Any,
    dims: tuple[int, int],
    step: int,
    metrics: MetricsLog,
) -> float:
    """Simulated AL on --eval-from (another prompt source's records; loaded once)."""
    batches = _eval_batches(cfg, dims)
    ev = evaluate(cfg, env, model, batches)
    metrics.write("eval_from", step, ev)
    if env.is_main:
        log(
            f"[eval-from] step {step}: sim AL {ev['sim_al']:.3f} acc_0 {ev['acc_0']:.3f} "
            f"on {sum(len(b.ids) for b in batches)} samples of {cfg.eval_from}"
        )
    return ev["sim_al"]


def _eval_batches(cfg: TrainDraftConfig, dims: tuple[int, int]) -> list[Batch]:
    """The first `max_eval` records of --eval-from as batches (loaded once per process)."""
    from specctl.train.data import DirSource, load_batch

    key = (cfg.eval_from, cfg.max_eval, cfg.batch_size, dims)
    if key not in _EVAL_SETS:
        items = DirSource(Path(str(cfg.eval_from)), *dims, 1.0, cfg.max_eval).heldout
        n = cfg.batch_size
        _EVAL_SETS[key] = [load_batch(items[a : a + n], *dims) for a in range(0, len(items), n)]
    return _EVAL_SETS[key]
