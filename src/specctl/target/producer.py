"""The producer loop of `specctl serve-target`: lease seqs, build samples, capture, pack, put.

A seq maps to a sample id as `epoch, index = divmod(seq, num_prompts)`, where the prompt space
is the dataset's usable prompts followed by `self_prompts` target-written ones. Every record is
a function of (epoch, index, seed) (see `generate`), so whichever producer makes it, and
however often a dead producer's lease is re-issued, the trainer sees the same sample.

Order of failure checks: model, data and aux layers are validated before anything is written
to the store, and a seq is marked done only after its record is published; an exception
releases the lease (the store client hands unfinished seqs back), so nothing half-written
is left behind.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from specctl.console import Progress, log
from specctl.errors import InputError, UsageError


@dataclass
class ServeTargetConfig:
    model: str = "smollm2-135m"
    engine: str = "hf"
    data: str | None = "chatterbot"  # built-in source, file or folder; None: self-prompts only
    aux_layers: list[int] = field(default_factory=list)  # 0-based layer outputs; [] = default
    device: str | None = None  # None: cuda if available, else cpu
    threads: int | None = None  # CPU threads (None: torch's default); 1 when cores are shared
    dtype: str = "bf16"  # record dtype: bf16 | fp32 (independent of the compute dtype)
    token_budget: int = 8192  # padded tokens per forward batch
    max_tokens: int = 2048  # longer samples are truncated
    lease_size: int = 8  # seqs per lease (one capture batch)
    regenerate: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    self_prompts: int = 0
    seed: int = 0
    epochs: int = 1
    max_samples: int | None = None
    to_dir: Path | None = None


@dataclass
class Totals:
    records: int = 0
    duplicates: int = 0
    tokens: int = 0
    bytes: int = 0


def run(cfg: ServeTargetConfig, store: str | None) -> dict[str, Any]:
    """Produce records until the run's limit; returns the summary."""
    from specctl.target import data, models
    from specctl.target.engines import build_engine

    # 1. validate everything before writing to the store (probe it first, handshake included:
    #    a dead store or a silent listener should fail in seconds, not after loading a model)
    if cfg.dtype not in ("bf16", "fp32"):
        raise UsageError(f"--dtype must be bf16 or fp32, not {cfg.dtype!r}")
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
    prompts = data.load_prompts(cfg.data, cfg.regenerate) if cfg.data is not None else []
    engine = build_engine(
        cfg.engine,
        model_path,
        device=cfg.device,
        aux_layers=cfg.aux_layers,
        token_budget=cfg.token_budget,
    )
    num_prompts = len(prompts) + cfg.self_prompts
    limit = num_prompts * cfg.epochs
    if cfg.max_samples is not None:
        limit = min(limit, cfg.max_samples)
    log(
        f"target {cfg.model}: {engine.num_layers} layers, H={engine.hidden_size}, aux layers "
        f"{engine.aux_layers}; {num_prompts} prompts x {cfg.epochs} epoch(s), limit {limit}"
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
            _loop(cfg, engine, prompts, num_prompts, sink, dtype, totals, progress)
            seconds = progress.elapsed
    finally:
        sink.close()
        engine.close()
    return {
        "records": totals.records,
        "duplicates": totals.duplicates,
        "tokens": totals.tokens,
        "bytes": totals.bytes,
        "seconds": round(seconds, 3),
        "prompts_per_s": round(totals.records / max(seconds, 1e-9), 3),
        "tokens_per_s": round(totals.tokens / max(seconds, 1e-9), 1),
        "mb_per_s": round(totals.bytes / 1e6 / max(seconds, 1e-9), 3),
        "num_prompts": num_prompts,
        "engine": cfg.engine,
        "model": cfg.model,
        "hidden_size": engine.hidden_size,
        "aux_layers": engine.aux_layers,
        "sink": str(cfg.to_dir) if cfg.to_dir else "store",
    }


def _check_ranges(cfg: ServeTargetConfig) -> None:
    for flag, value, low in (
        ("--epochs", cfg.epochs, 1),
        ("--max-samples", cfg.max_samples, 1),
        ("--max-new-tokens", cfg.max_new_tokens, 1),
        ("--self-prompts", cfg.self_prompts, 0),
        ("--temperature", cfg.temperature, 0),
    ):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    if not 0 < cfg.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {cfg.top_p}")


def _check_writable(folder: Path) -> None:
    """Fail before loading the model, without creating anything yet."""
    from specctl.paths import unwritable_ancestor

    if (parent := unwritable_ancestor(folder)) is not None:
        raise InputError(f"cannot write records under --to-dir {folder}: {parent} is not writable")


def _open_sink(
    cfg: ServeTargetConfig, store: str | None, num_prompts: int, limit: int, engine: Any
) -> Any:
    from specctl.target.sinks import DirSink, StoreSink

    if cfg.to_dir is not None:
        meta = {
            "model": cfg.model,
            "seed": cfg.seed,
            "hidden_size": engine.hidden_size,
            "aux_layers": engine.aux_layers,
            "regenerate": cfg.regenerate,
        }
        sink = DirSink(cfg.to_dir, num_prompts, limit, meta)
        from specctl.config import save_config

        save_config(cfg, cfg.to_dir / "serve_target.json")
        return sink
    return StoreSink(store, num_prompts, limit, engine)


def _loop(
    cfg: ServeTargetConfig,
    engine: Any,
    prompts: list,
    num_prompts: int,
    sink: Any,
    dtype: Any,
    totals: Totals,
    progress: Progress,
) -> None:
    from specctl.pack import pack_record, record_nbytes
    from specctl.target.samples import build_samples

    while (seqs := sink.lease(cfg.lease_size)) is not None:
        # 1. seq -> sample id -> tokenised sample (regenerated / self-prompted as configured)
        ids = [divmod(s, num_prompts) for s in seqs]
        samples = build_samples(engine, prompts, ids, cfg)
        # 2. one capture pass for the lease; 3. pack each into the sink's buffer and publish
        for seq, (epoch, index), got in zip(seqs, ids, engine.capture(samples), strict=True):
            t = len(got.input_ids)
            nbytes = record_nbytes(t, engine.hidden_size, len(got.aux), dtype)
            buf = pack_record(
                epoch=epoch,
                index=index,
                input_ids=_i32(got.input_ids),
                loss_mask=_u8(got.loss_mask),
                aux_hidden=got.aux,
                last_hidden=got.last,
                dtype=dtype,
                out=sink.buffer(nbytes),
            )
            if sink.put(buf, epoch, index, t):
                totals.records += 1
                totals.tokens += t
                totals.bytes += nbytes
            else:
                totals.duplicates += 1
            sink.done(seq)
        el = max(progress.elapsed, 1e-9)
        progress.update(
            len(seqs),
            **{
                "prompts/s": totals.records / el,
                "tok/s": totals.tokens / el,
                "MB/s": totals.bytes / 1e6 / el,
                "inflight_MB": sink.inflight_bytes() / 1e6,
            },
        )


def _i32(ids: list[int]) -> Any:
    import torch

    return torch.tensor(ids, dtype=torch.int32)


def _u8(mask: list[int]) -> Any:
    import torch

    return torch.tensor(mask, dtype=torch.uint8)


def config_dict(cfg: ServeTargetConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
