"""The broadcast weight sync (herd.train.rl.weight_sync) on CPU: a learner process and a worker
process over gloo, the worker's model ends bit-identical to the learner's, with its version."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

import herd
from herd.train.rl.weight_sync import BroadcastSync, backend_for
from tests.conftest import model_config


def _member(rank: int, init_method: str, out: str) -> None:
    torch.set_num_threads(1)
    model = herd.build_model(model_config(vision=False), seed=rank)  # different weights on each side
    sync = BroadcastSync(rank, 2, init_method)
    try:
        if rank == 0:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.5)
            sync.send(model.state_dict(), version=3)
            torch.save(model.state_dict(), out + ".learner")
        else:
            version = sync.receive(model)
            torch.save({"version": version, "state": model.state_dict()}, out + ".worker")
    finally:
        sync.close()


def test_gloo_broadcast_makes_the_worker_equal_to_the_learner(tmp_path):
    out = str(tmp_path / "state")
    mp.spawn(_member, args=(f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, join=True)
    learner = torch.load(out + ".learner")
    worker = torch.load(out + ".worker")
    assert worker["version"] == 3
    assert learner.keys() == worker["state"].keys()
    for k, v in learner.items():
        assert torch.equal(v, worker["state"][k]), k


def test_nccl_without_cuda_is_one_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: NCCL is allowed")
    with pytest.raises(ValueError, match="needs CUDA"):
        backend_for("cuda")
    assert backend_for("cpu") == "gloo"
