"""Ray topology end to end on the tiny model: the learner and 2 rollout workers are Ray actors,
weights go through the object store, a worker killed mid-run is replaced, the learner's errors
reach the caller as themselves."""

from __future__ import annotations

import json
import os
import threading
import warnings

import pytest

ray = pytest.importorskip("ray")

from herd.train.rl.launch import (  # noqa: E402
    cpu_share, from_wire, make_learner, make_workers, run_learner, to_wire)
from tests.train.rl.conftest import tiny_cfg  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 * 1024, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


def test_learner_and_two_workers_as_ray_actors_and_a_killed_worker_is_replaced(rl_model, tmp_path, ray_local):
    out = tmp_path / "ray"
    cfg = tiny_cfg(rl_model, out, workers=2, max_staleness=1, max_steps=6, eval_every=6)
    cpus = cpu_share(2)
    workers = make_workers(cfg, 2, cpus)
    learner = make_learner(cpus)
    seen = {"pid_before": ray.get(workers[0].pid.remote())}

    def kill_mid_run():  # a worker dies mid-run (its in-flight requests fail); Ray restarts it
        while ray.get(learner.progress.remote())[0] < 2:
            threading.Event().wait(0.05)
        ray.kill(workers[0], no_restart=False)
        seen["killed_at"] = ray.get(learner.progress.remote())[0]

    killer = threading.Thread(target=kill_mid_run, daemon=True)
    killer.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        summary = run_learner(cfg, learner, workers, poll_s=0.05)
    killer.join(timeout=30)
    assert seen["killed_at"] < 6, "the worker was killed only after the run ended"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and summary["step"] == 6
    assert all(r["staleness/max"] <= 1 for r in rows)
    assert rows[0]["mismatch_kl"] <= 1e-6  # step 1: every sample came from the initial weights
    assert (out / "model.safetensors").exists() and (out / "checkpoints").is_dir()  # written by the learner actor
    assert ray.get(learner.pid.remote()) != os.getpid()  # the learner trained in its own process
    pid_after = ray.get(workers[0].pid.remote(), timeout=60)
    assert pid_after != seen["pid_before"]  # the killed worker was replaced by a new process
    # and it holds the newest weights (version 5: published before step 6) from the object store
    assert ray.get(workers[0].set_weights.remote({}, -1)) == 5
    assert ray.get(workers[1].set_weights.remote({}, -1)) == 5
    for actor in (learner, *workers):  # free their CPUs for the next test
        ray.kill(actor, no_restart=True)


def test_an_error_in_the_learner_actor_reaches_the_caller_as_itself(rl_model, tmp_path, ray_local):
    cfg = tiny_cfg(rl_model, tmp_path / "bad", workers=1, tasks="digits_vqa")  # images, text-only model
    workers, learner = make_workers(cfg, 1, 0.5), make_learner(0.5)
    with pytest.raises(ValueError, match="text-only"):
        run_learner(cfg, learner, workers, poll_s=0.05)
    for actor in (learner, *workers):
        ray.kill(actor, no_restart=True)


def test_weights_cross_the_object_store_bit_exact(ray_local):
    """Published weights travel as numpy arrays (one memcpy in, zero-copy out) and arrive bit-identical,
    bf16 included (it has no numpy dtype and travels as a tensor)."""
    import torch

    sd = {"w": torch.randn(64, 32), "b": torch.randn(32).to(torch.bfloat16), "i": torch.arange(5)}
    back = from_wire(ray.get(ray.put(to_wire(sd))))
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
