"""The only place with process groups, device meshes, FSDP2, mixed precision and compile.

Every run is a process group, even a single process (a world of 1 over an in-memory
store), so one code path trains on 1 or N ranks: gloo on CPU, nccl on CUDA.

Traps:
- FSDP2 hooks only run on `module.forward`: the whole TTT unroll runs inside one
  `TTTModel.forward`, so a step is one all-gather and one reduce-scatter, and the draft's
  own methods (`combine`, `step`) see unsharded parameters inside it.
- FSDP2 averages gradients over ranks; the objective already divides by the *global*
  token count, so the loop backpropagates `loss * world` (a sum over ranks), which makes
  N ranks == 1 rank. (`set_gradient_divide_factor(1.0)` would say it directly, but it
  reduces with PREMUL_SUM, which gloo refuses.)
- Mixed precision casts floating forward inputs to the param dtype; the frozen target
  lm_head is kept as a plain attribute (not a parameter, not an input) so it stays fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun's env -> its process group; a bare process -> a world of one."""
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(backend)
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        return Dist(dist.get_rank(), dist.get_world_size(), local, device)
    if cuda:
        torch.cuda.set_device(0)
    if not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(0, 1, 0, torch.device("cuda", 0) if cuda else torch.device("cpu"))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, env: Dist, precision: str, compile_layer: bool) -> nn.Module:
    """Compile (optional), then FSDP2 `fully_shard` as one group with bf16/fp32 params."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if compile_layer and hasattr(model.draft, "midlayer"):  # EAGLE-3's decoder layer only
        model.draft.midlayer.compile()  # type: ignore[union-attr]
    mesh = init_device_mesh(env.device.type, (env.world,))
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if precision == "bf16" else None, reduce_dtype=torch.float32
    )
    sharded: nn.Module = fully_shard(model, mesh=mesh, mp_policy=mp)  # type: ignore[assignment]
    return sharded


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    dist.all_reduce(t, op=ops[op])
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    dist.broadcast(t, src)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    dist.barrier()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU copy of every parameter and buffer (a collective: call on all ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return dict(get_model_state_dict(model, options=opts))  # type: ignore[arg-type]


def load_full_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # A tied parameter (MLP speculator tie_weights) is saved under every module slot, but
    # DCP only shards the first name onto the mesh: drop the aliases (the first name loads
    # the shared tensor) and keep strictness for everything else by hand.
    first = {n for n, _ in model.named_parameters()}
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - first
    full: dict[str, Any] = {k: v for k, v in sd.items() if k not in aliases}
    opts = StateDictOptions(full_state_dict=True, strict=not aliases)
    got = set_model_state_dict(model, full, options=opts)
    missing = set(got.missing_keys) - aliases
    if missing or got.unexpected_keys:
        raise RuntimeError(
            f"state dict mismatch: missing {sorted(missing)}, "
            f"unexpected {sorted(got.unexpected_keys)}"
        )


def full_optimizer_state(model: nn.Module, optim: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optim, options=opts)


def load_optimizer_state(model: nn.Module, optim: torch.optim.Optimizer, sd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optim, sd, options=StateDictOptions(full_state_dict=True))
