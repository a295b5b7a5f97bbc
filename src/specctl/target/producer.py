"""The producer loop of `specctl serve-target`: lease seqs, build samples, capture, pack, put.

A seq maps to a sample id as `epoch, index = divmod(seq, num_prompts)`, where the prompt space
mixes the `--data` sources by weight (`mix`: built-ins, files, `self` target-written
prompts). Every record is a function of (epoch, index, seed) (see `generate`), so whichever
producer makes it, and however often a dead producer's lease is re-issued, the trainer sees
the same sample. Samples that repeat one already produced in the run are dropped before
capture (`dedup`).

When a producer stops: after `--epochs` passes or `--max-samples` samples (all producers
together); with `--epochs 0` (endless, fresh samples each epoch when temperature > 0) at
`--max-samples` or when the run is over: every trainer that joined the store left cleanly
(for 10 s), or `specctl store down` was called (`sinks.StoreSink.run_over`, checked before
each lease and while waiting for room in the store). A store that vanishes is an error (exit
1, StoreUnavailable); a trainer that crashed does not stop producers (its resume still
needs data).

Order of failure checks: model, data and aux layers are validated before anything is written
to the store, and a seq is marked done only after its record is published; an exception
releases the lease (the store client hands unfinished seqs back), so nothing half-written
is left behind.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from specctl import precision
from specctl.console import Progress, log
from specctl.errors import InputError, UsageError
from specctl.target.generate import GenStats
from specctl.target.mix import DataMix, PromptSpace


@dataclass
class ServeTargetConfig:
    model: str = "smollm2-135m"
    engine: str = "hf"
    # sources with optional weights: "chatterbot:3,self:2,chats.jsonl:1", a list of such items
    # or {sources: [...]}; None: self-prompts only. See target/mix.py.
    data: str | list[str] | DataMix | None = "chatterbot"
    aux_layers: list[int] = field(default_factory=list)  # 0-based layer outputs; [] = default
    # which hidden states records carry: "all" (aux + last, EAGLE-3) or "last" (last_hidden
    # only, H instead of (k+1)*H values a token: what an MLP speculator reads)
    features: str = "all"
    device: str | None = None  # None: cuda if available, else cpu
    threads: int | None = None  # CPU threads (None: torch's default); 1 when cores are shared
    dtype: str = "bf16"  # record dtype: bf16 | fp32 (independent of the compute dtype)
    # compute dtype of the hf engine: auto (GPU: bf16; CPU: the faster of fp32 and bf16, timed
    # at start, see specctl/precision.py) | fp32 | bf16
    precision: str = "auto"
    token_budget: int = 8192  # padded tokens per forward batch
    max_tokens: int = 2048  # longer samples are truncated
    lease_size: int = 16  # seqs per lease: one regeneration + capture batch (16: ~7x batch 1)
    regenerate: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    self_prompts: int = 0
    seed: int = 0
    epochs: int = 1  # 0: until --max-samples or the run is over (see module docstring)
    dedup: str = "auto"  # drop repeated generated samples: auto | on | off (samples.py)
    max_samples: int | None = None
    to_dir: Path | None = None


@dataclass
class Totals:
    records: int = 0
    duplicates: int = 0  # another producer already published the sample (re-issued lease)
    duplicates_dropped: int = 0  # same tokens as a sample already produced in this run
    tokens: int = 0
    bytes: int = 0
    sources: dict[str, int] = field(default_factory=dict)  # published records per source
    gen: GenStats = field(default_factory=GenStats)


def run(cfg: ServeTargetConfig, store: str | None) -> dict[str, Any]:
    """Produce records until the run's limit; returns the summary."""
    from specctl.target import mix, models
    from specctl.target.engines import build_engine

    # 1. validate everything before writing to the store (probe it first, handshake included:
    #    a dead store or a silent listener should fail in seconds, not after loading a model)
    if cfg.dtype not in ("bf16", "fp32"):
        raise UsageError(f"--dtype must be bf16 or fp32, not {cfg.dtype!r}")
    precision.parse(cfg.precision)
    if cfg.features not in ("all", "last"):
        raise UsageError(f"--features must be all or last, not {cfg.features!r}")
    if cfg.data is None and cfg.self_prompts <= 0:
        raise UsageError("no prompts: give --data or --self-prompts N")
    _check_ranges(cfg)
    if cfg.to_dir is not None:
        _check_writable(cfg.to_dir)
    else:
        from specctl.store.address import parse, require
        from specctl.store.control import Control

        addr = parse(store)
        require(addr.host, addr.port, 5.0, "specctl store")
        Control.connect(addr.host, addr.port, 5.0)  # dropped at once; the sink connects later
    model_path = models.resolve_model(cfg.model)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    space = mix.build_space(cfg.data, cfg.self_prompts, cfg.regenerate)
    engine = build_engine(
        cfg.engine,
        model_path,
        device=cfg.device,
        aux_layers=cfg.aux_layers,
        token_budget=cfg.token_budget,
        precision=cfg.precision,
    )
    num_prompts = space.size
    limit = num_prompts * cfg.epochs if cfg.epochs > 0 else None
    if cfg.max_samples is not None:
        limit = min(limit or cfg.max_samples, cfg.max_samples)
    log(f"prompts: {space.describe()}")
    log(
        f"target {cfg.model} ({_precision(engine)}): {engine.num_layers} layers, "
        f"H={engine.hidden_size}, features "
        f"{_features(cfg, engine)}; {num_prompts} prompts x {cfg.epochs} epoch(s), limit {limit}"
    )
    # 2. open the sink (store or folder) and produce
    import torch

    try:
        sink = _open_sink(cfg, store, num_prompts, limit, engine)
    except BaseException:
        engine.close()
        raise
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    totals = Totals()
    try:
        with Progress("serve-target", total=limit) as progress:
            _loop(cfg, engine, space, num_prompts, sink, dtype, totals, progress)
            seconds = progress.elapsed
    finally:
        sink.close()
        engine.close()
    gen = totals.gen
    return {
        "records": totals.records,
        "duplicates": totals.duplicates,
        "duplicates_dropped": totals.duplicates_dropped,
        "sources": dict(sorted(totals.sources.items())),
        "regenerated_tokens": gen.tokens,
        "regen_tokens_per_s": round(gen.tokens / gen.seconds, 1) if gen.seconds else None,
        "self_prompts_rejected": gen.rejected,
        "self_prompts_fallback": gen.fallbacks,
        "stopped": getattr(sink, "stopped", None) or "limit",
        "tokens": totals.tokens,
        "bytes": totals.bytes,
        "seconds": round(seconds, 3),
        "prompts_per_s": round(totals.records / max(seconds, 1e-9), 3),
        "tokens_per_s": round(totals.tokens / max(seconds, 1e-9), 1),
        "mb_per_s": round(totals.bytes / 1e6 / max(seconds, 1e-9), 3),
        "num_prompts": num_prompts,
        "engine": cfg.engine,
        "precision": getattr(engine, "precision", None),
        "model": cfg.model,
        "hidden_size": engine.hidden_size,
        "aux_layers": engine.aux_layers,
        "features": cfg.features,
        "bytes_per_token": round(totals.bytes / max(totals.tokens, 1), 1),
        "sink": str(cfg.to_dir) if cfg.to_dir else "store",
    }


def _check_ranges(cfg: ServeTargetConfig) -> None:
    for flag, value, low in (
        ("--epochs", cfg.epochs, 0),
        ("--max-samples", cfg.max_samples, 1),
        ("--max-new-tokens", cfg.max_new_tokens, 1),
        ("--self-prompts", cfg.self_prompts, 0),
        ("--temperature", cfg.temperature, 0),
    ):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    if not 0 < cfg.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if cfg.dedup not in ("auto", "on", "off"):
        raise UsageError(f"dedup must be auto, on or off, not {cfg.dedup!r}")
    if cfg.epochs == 0 and cfg.max_samples is None and cfg.to_dir is not None:
        raise UsageError("--epochs 0 with --to-dir never ends: give --max-samples N")


def _check_writable(folder: Path) -> None:
    """Fail before loading the model, without creating anything yet."""
    from specctl.paths import unwritable_ancestor

    if (parent := unwritable_ancestor(folder)) is not None:
        raise InputError(f"cannot write records under --to-dir {folder}: {parent} is not writable")


def _open_sink(
    cfg: ServeTargetConfig, store: str | None, num_prompts: int, limit: int | None, engine: Any
) -> Any:
    from specctl.target.sinks import DirSink, StoreSink

    if cfg.to_dir is not None:
        meta = {
            "model": cfg.model,
            "seed": cfg.seed,
            "hidden_size": engine.hidden_size,
            "aux_layers": engine.aux_layers,
            "features": cfg.features,
            "regenerate": cfg.regenerate,
        }
        sink = DirSink(cfg.to_dir, num_prompts, limit, meta)
        from specctl.config import save_config

        save_config(cfg, cfg.to_dir / "serve_target.json")
        return sink
    return StoreSink(store, num_prompts, limit, engine, cfg.features, endless=cfg.epochs == 0)


def _loop(
    cfg: ServeTargetConfig,
    engine: Any,
    space: PromptSpace | list,
    num_prompts: int,
    sink: Any,
    dtype: Any,
    totals: Totals,
    progress: Progress,
) -> None:
    from specctl.target.dedup import Dedup
    from specctl.target.sinks import RunOver

    if not isinstance(space, PromptSpace):
        space = PromptSpace.from_prompts(space, num_prompts - len(space))
    dedup = getattr(sink, "dedup", None) or Dedup()
    pending: deque[_Pending] = deque()
    try:
        _produce(cfg, engine, space, num_prompts, sink, dtype, totals, progress, dedup, pending)
    except RunOver as stop:  # the trainer finished while we waited for room: a clean end
        log(f"stopping: {stop}")
    sink.flush()
    _settle(pending, sink, totals)


@dataclass
class _Pending:
    """A put whose future may not be done yet (a transfer runs while the next record is packed)."""

    future: Any  # its result is truthy when this put published the sample
    seq: int
    tokens: int
    nbytes: int
    source: str


def _settle(pending: deque[_Pending], sink: Any, totals: Totals) -> None:
    """Count the finished puts, oldest first, and only then mark their seqs done, so a
    producer that dies before hands them back. A failed put raises its error here."""
    while pending and pending[0].future.done():
        p = pending.popleft()
        if p.future.result():
            totals.records += 1
            totals.tokens += p.tokens
            totals.bytes += p.nbytes
            totals.sources[p.source] = totals.sources.get(p.source, 0) + 1
        else:
            totals.duplicates += 1
        sink.done(p.seq)


def _produce(
    cfg: ServeTargetConfig,
    engine: Any,
    space: PromptSpace,
    num_prompts: int,
    sink: Any,
    dtype: Any,
    totals: Totals,
    progress: Progress,
    dedup: Any,
    pending: deque[_Pending],
) -> None:
    from specctl.pack import pack_record, record_nbytes
    from specctl.target.samples import build_samples, deduplicated

    while (seqs := sink.lease(cfg.lease_size)) is not None:
        # 1. seq -> sample id -> tokenised sample (regenerated / self-prompted as configured)
        ids = [divmod(s, num_prompts) for s in seqs]
        samples = build_samples(engine, space, ids, cfg, totals.gen)
        leased = len(seqs)
        # 2. drop repeats of samples already produced in this run (before paying for capture)
        kept = []
        for seq, (epoch, index), smp in zip(seqs, ids, samples, strict=True):
            pick = space.pick(cfg.seed, epoch, index)
            if not deduplicated(pick, cfg) or dedup.keep(smp, epoch, index):
                kept.append((seq, (epoch, index), smp))
            else:
                totals.duplicates_dropped += 1
                sink.done(seq)
        seqs, ids, samples = [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]
        # 3. one capture pass for the lease; 4. pack each into the sink's buffer and put it
        #    (on the store's host, its object, the batch's objects reserved at once;
        #    elsewhere record n is transferred while n + 1 is packed)
        captured = engine.capture(samples) if samples else []
        records = []  # (nbytes, (epoch, index, T)): the batch's puts begin at once
        for (epoch, index), got in zip(ids, captured, strict=True):
            t, aux = len(got.input_ids), _aux(got, cfg)
            records.append(
                (record_nbytes(t, engine.hidden_size, len(aux or []), dtype), (epoch, index, t))
            )
        sink.prepare(records)
        for seq, got, (nbytes, (epoch, index, t)) in zip(seqs, captured, records, strict=True):
            aux = _aux(got, cfg)
            buf = pack_record(
                epoch=epoch,
                index=index,
                input_ids=_i32(got.input_ids),
                loss_mask=_u8(got.loss_mask),
                aux_hidden=aux,
                last_hidden=got.last,
                dtype=dtype,
                out=sink.buffer(nbytes, (epoch, index, t)),
            )
            source = space.pick(cfg.seed, epoch, index).source
            pending.append(_Pending(sink.put(buf, epoch, index, t), seq, t, nbytes, source))
            _settle(pending, sink, totals)
        el = max(progress.elapsed, 1e-9)
        progress.update(
            leased,
            **{
                "prompts/s": totals.records / el,
                "tok/s": totals.tokens / el,
                "MB/s": totals.bytes / 1e6 / el,
                "inflight_MB": sink.inflight_bytes() / 1e6,
            },
        )


def _aux(got: Any, cfg: ServeTargetConfig) -> Any:
    return got.aux if cfg.features == "all" else None  # "last": no aux sections


def _precision(engine: Any) -> str:
    got = getattr(engine, "precision", None)
    if not got:
        return "engine's dtype"
    timed = (
        f"; timed {got['fp32_ms']} ms fp32 vs {got['bf16_ms']} ms bf16" if "fp32_ms" in got else ""
    )
    return f"{got['dtype']}{timed}"


def _features(cfg: ServeTargetConfig, engine: Any) -> str:
    if cfg.features == "last":
        return "last hidden only"
    return f"aux layers {engine.aux_layers} + last hidden"


def _i32(ids: list[int]) -> Any:
    import torch

    return torch.tensor(ids, dtype=torch.int32)


def _u8(mask: list[int]) -> Any:
    import torch

    return torch.tensor(mask, dtype=torch.uint8)


def config_dict(cfg: ServeTargetConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
