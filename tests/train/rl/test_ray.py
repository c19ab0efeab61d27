"""A 2-worker Ray run of the tiny model end to end, with one worker killed mid-run and replaced."""

from __future__ import annotations

import json
import warnings

import pytest

ray = pytest.importorskip("ray")

from herd.train.rl.launch import RayRollouts, make_workers  # noqa: E402
from herd.train.rl.learner import train  # noqa: E402
from tests.train.rl.conftest import tiny_cfg  # noqa: E402


@pytest.fixture
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 * 1024, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


def test_two_ray_workers_end_to_end_and_a_killed_worker_is_replaced(rl_model, tmp_path, ray_local):
    out = tmp_path / "ray"
    cfg = tiny_cfg(rl_model, out, workers=2, max_staleness=1, max_steps=4, eval_every=4)
    made = {}

    class KillOnce(RayRollouts):
        def publish(self, state, version):
            super().publish(state, version)
            if version == 2:  # a worker dies mid-run (its in-flight requests fail); Ray restarts it
                made["pid_before"] = ray.get(self.workers[0].pid.remote())
                ray.kill(self.workers[0], no_restart=False)

    def backend(cfg):
        made["backend"] = KillOnce(make_workers(cfg, cfg.workers))
        return made["backend"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        summary = train(cfg, backend_factory=backend)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and summary["step"] == 4
    assert all(r["staleness/max"] <= 1 for r in rows)
    assert rows[0]["mismatch_kl"] <= 1e-6  # step 1: every sample came from the initial weights
    workers = made["backend"].workers
    pid_after = ray.get(workers[0].pid.remote(), timeout=60)
    assert pid_after != made["pid_before"]  # the killed worker was replaced by a new process
    # and it serves the newest weights (version 3: published before step 4), not its initial ones
    assert ray.get(workers[0].set_weights.remote({}, -1)) == 3
