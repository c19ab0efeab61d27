"""Weight sync by a torch.distributed broadcast group: the learner (rank 0) sends, rollout workers
(ranks 1…N) receive, one collective per dtype bucket instead of a trip through an object store.

This is how GPU RL systems move weights (TRL's async GRPO and verl over NCCL, PipelineRL's in-flight
updates): after each optimizer step the learner broadcasts and every worker copies the new values
into its own parameters between two requests. herd's default transport is Ray's object store
(herd.train.rl.launch), which works anywhere; this module is the collective, with the same
`version` contract:

    sync = BroadcastSync(rank, world_size, init_method)     # every member, once
    sync.send(model.state_dict(), version)                    # learner, rank 0
    version = sync.receive(worker_model)                      # each worker: in-place copy

Layout: the state dict's tensors, in key order, are flattened into one contiguous buffer per dtype
(a float32 bucket, an int64 bucket, ...); a small header broadcast first carries the version and
the bucket sizes, so a worker whose model does not match the learner's fails with a clear error
instead of silently reading shifted weights.

Backend: gloo on CPU (tested here: tests/train/rl/test_weight_sync.py, two processes); NCCL needs
CUDA on every member (`backend_for` checks). Not wired into `herd rl` yet: with NCCL, the workers
must block in `receive` while the learner sends, so the Ray launcher would have to pause
generation for each update; that path and an FSDP2-sharded learner need GPUs to test and are not
built here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def backend_for(device: str) -> str:
    """gloo for CPU tensors; NCCL only where CUDA is available."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("NCCL weight sync needs CUDA on every member; this machine has none (use cpu/gloo)")
        return "nccl"
    return "gloo"


def buckets(state: dict[str, torch.Tensor]) -> dict[torch.dtype, list[str]]:
    """Keys grouped by dtype, each group in sorted key order (the same on every member)."""
    out: dict[torch.dtype, list[str]] = {}
    for k in sorted(state):
        out.setdefault(state[k].dtype, []).append(k)
    return out


class BroadcastSync:
    def __init__(self, rank: int, world_size: int, init_method: str, device: str = "cpu"):
        if world_size < 2:
            raise ValueError(f"a broadcast group needs the learner and ≥ 1 worker (world size ≥ 2), got {world_size}")
        self.rank, self.device = rank, torch.device(device)
        self.group_backend = backend_for(device)
        if not dist.is_initialized():
            dist.init_process_group(self.group_backend, init_method=init_method, rank=rank, world_size=world_size)

    def _header(self, sizes: list[int], version: int) -> torch.Tensor:
        return torch.tensor([version, len(sizes), *sizes], dtype=torch.int64, device=self.device)

    def send(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Rank 0: broadcast every tensor of `state` (one flat buffer per dtype) and the version."""
        groups = buckets(state)
        flats = [torch.cat([state[k].detach().reshape(-1).to(self.device) for k in keys]) for keys in groups.values()]
        header = self._header([f.numel() for f in flats], version)
        dist.broadcast(torch.tensor([header.numel()], dtype=torch.int64, device=self.device), src=0)
        dist.broadcast(header, src=0)
        for f in flats:
            dist.broadcast(f, src=0)

    def receive(self, model: torch.nn.Module) -> int:
        """Ranks ≥ 1: receive the learner's weights into `model` in place → the version sent."""
        n = torch.zeros(1, dtype=torch.int64, device=self.device)
        dist.broadcast(n, src=0)
        header = torch.zeros(int(n), dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=0)
        version, count, sizes = int(header[0]), int(header[1]), header[2:].tolist()
        state = model.state_dict()
        groups = buckets(state)
        mine = [sum(state[k].numel() for k in keys) for keys in groups.values()]
        if count != len(mine) or sizes != mine:
            raise ValueError(f"weight sync: the learner sent buckets of {sizes} elements, this worker's model has "
                             f"{mine}: learner and workers must load the same architecture")
        with torch.no_grad():
            for (dtype, keys), size in zip(groups.items(), sizes):
                flat = torch.empty(size, dtype=dtype, device=self.device)
                dist.broadcast(flat, src=0)
                offset = 0
                for k in keys:
                    t = state[k]
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()
        return version

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
