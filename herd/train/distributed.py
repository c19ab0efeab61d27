"""Scale-out with torch.distributed: gloo on CPUs, NCCL on GPUs, parameters sharded with FSDP2.

    torchrun --nproc_per_node 2 -m herd train --preset tiny ...

Each decoder layer becomes one FSDP2 unit (`fully_shard`), the rest (embeddings, head, vision
tower) the root unit: a
rank holds 1/world of every parameter, gathers a layer's weights just before using them and
reduce-scatters its gradients right after. FSDP2 runs on CPU with gloo in torch 2.13; if it
cannot be set up, DDP is used instead and the reason printed. Checkpoints always hold *full*
tensors (gathered to rank 0), so a checkpoint written by N ranks loads in any number of ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mode: str = "single"  # single | fsdp | ddp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> DistEnv:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device, local_rank) if device == "cuda" else torch.device(device)
    if world <= 1:
        return DistEnv(device=dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend)
    return DistEnv(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=dev,
                   mode="pending")


def wrap(model: torch.nn.Module, env: DistEnv, mode: str = "fsdp") -> torch.nn.Module:
    """Shard (FSDP2) or replicate (DDP) the model across ranks. Returns the module to train."""
    if not env.distributed:
        env.mode = "single"
        return model
    if mode == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard

            for layer in model.language_model.model.layers:
                fully_shard(layer)
            # The vision tower stays in the root unit: a rank whose batch has no image skips it,
            # and a unit of its own would then miss its all-gather while other ranks wait in it.
            fully_shard(model)
            env.mode = "fsdp"
            return model
        except Exception as e:  # noqa: BLE001 — report and fall back
            if env.is_main:
                print(f"FSDP2 unavailable here ({e}); falling back to DDP")
    from torch.nn.parallel import DistributedDataParallel as DDP

    env.mode = "ddp"
    return DDP(model, find_unused_parameters=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and not hasattr(model, "config") else model


def full_model_state(model: torch.nn.Module, env: DistEnv) -> dict | None:
    """Full (unsharded) weights on the CPU, on rank 0 (None on other ranks); plain state_dict when single."""
    if env.mode != "fsdp":
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()} if env.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if env.is_main else None


def full_optimizer_state(model, optimizer, env: DistEnv) -> dict | None:
    if env.mode != "fsdp":
        return optimizer.state_dict() if env.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if env.is_main else None


def load_full_model_state(model, state: dict, env: DistEnv) -> None:
    if env.mode != "fsdp":
        unwrap(model).load_state_dict(state, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def load_full_optimizer_state(model, optimizer, state: dict, env: DistEnv) -> None:
    if env.mode != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def mean_across_ranks(value: float, env: DistEnv) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / env.world


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def teardown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
