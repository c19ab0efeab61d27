"""Ray launcher for `herd rl`: rollout workers as Ray actors, weights through Ray's object store.

The only module that imports Ray. The worker is herd.train.rl.actor.RolloutWorker unchanged,
wrapped in a Ray actor; the learner is the process that runs the shared loop (this one, on the
driver: it owns the run directory, checkpoints and the progress bar). Per update:

    ref = ray.put(state_dict)                    # one copy in the object store, version = steps
    worker.set_weights.remote(ref, version)      # each worker; actor calls run in order, so the
                                                 # switch happens between two rollout requests
    worker.rollout.remote(prompt_index, ids, G)  # → Rollout(version=the weights it ran on)

Workers keep generating while the learner trains (up to one batch ahead when max_staleness > 0);
the learner's StalenessBuffer drops whatever comes back older than the bound.

Faults: workers are created with `max_restarts=-1`; when one dies (OOM, SIGKILL, a lost node)
its pending requests fail with a RayActorError, Ray restarts it from its constructor (initial
weights, version 0), and the backend re-sends the newest weights and the failed requests to it
while the other workers carry on (`workers/restarts` counts these). A local run starts Ray on
this machine's cores without the dashboard; `--ray-address` joins an existing cluster and the
same code runs there (workers may then sit on other machines: they load --init themselves, so
the directory must be reachable there).
"""

from __future__ import annotations

import os

import torch

from herd.train.rl.actor import Rollout


def _worker_class():
    import ray

    from herd.train.rl.actor import RolloutWorker

    @ray.remote(max_restarts=-1, max_task_retries=0)
    class RayRolloutWorker:
        def __init__(self, init: str, max_new_tokens: int, temperature: float, seed: int, worker_id: int):
            torch.set_num_threads(1)
            from herd.train.loop import init_from

            model, tok = init_from(init)
            self.worker = RolloutWorker(model, tok, max_new_tokens=max_new_tokens, temperature=temperature,
                                        seed=seed, worker_id=worker_id)

        def set_weights(self, state_dict, version: int) -> int:
            return self.worker.set_weights(state_dict, version)

        def rollout(self, prompt_index: int, prompt_ids: list[int], n: int) -> Rollout:
            return self.worker.rollout(prompt_index, prompt_ids, n)

        def pid(self) -> int:
            return os.getpid()

    return RayRolloutWorker


class RayRollouts:
    """The learner's rollout backend over Ray actors (same interface as actor.LocalRollouts)."""

    def __init__(self, workers: list):
        self.workers = workers
        self.pending: dict = {}  # ObjectRef → (worker index, request)
        self.latest = None       # (object ref of the newest weights, version)
        self.restarts = 0

    def publish(self, state_dict: dict, version: int) -> None:
        import ray

        ref = ray.put({k: v.detach().cpu().clone() for k, v in state_dict.items()})
        self.latest = (ref, version)
        for w in self.workers:
            w.set_weights.remote(ref, version)

    def _send(self, w: int, request: tuple) -> None:
        self.pending[self.workers[w].rollout.remote(*request)] = (w, request)

    def submit(self, prompt_index: int, prompt_ids: list[int], n: int) -> None:
        load = [0] * len(self.workers)
        for w, _ in self.pending.values():
            load[w] += 1
        self._send(min(range(len(self.workers)), key=load.__getitem__), (prompt_index, prompt_ids, n))

    def in_flight(self) -> int:
        return len(self.pending)

    def ready(self, timeout: float | None = None) -> list[Rollout]:
        """Block until at least one request finishes; return every finished one."""
        import ray
        from ray.exceptions import RayActorError

        if not self.pending:
            return []
        done, rest = ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        if rest:  # and whatever else has finished meanwhile
            done += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        out = []
        for ref in done:
            w, request = self.pending.pop(ref)
            try:
                out.append(ray.get(ref))
            except RayActorError:
                # the worker died: Ray restarts it with the initial weights; hand it the newest, retry
                self.restarts += 1
                if self.latest is not None:
                    self.workers[w].set_weights.remote(*self.latest)
                self._send(w, request)
        return out

    def close(self) -> None:
        self.pending.clear()


def start_ray(address: str | None, num_cpus: int | None = None, object_store_memory: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True,
                 object_store_memory=object_store_memory or 256 * 1024 * 1024)


def make_workers(cfg, n: int) -> list:
    cls = _worker_class()
    import ray

    cpus = max(1.0, float(ray.available_resources().get("CPU", 1))) / (n + 1)  # learner gets a share too
    workers = [cls.options(num_cpus=cpus).remote(cfg.init, cfg.max_new_tokens, cfg.temperature, cfg.seed, i)
               for i in range(n)]
    ray.get([w.pid.remote() for w in workers])  # wait until each has loaded its model (not counted as training)
    return workers


def launch(cfg) -> dict:
    """`herd rl` with --workers N ≥ 1: Ray workers + the learner here. Ray is shut down on exit if
    this call started it."""
    import ray

    from herd.train.rl.learner import train

    started = not ray.is_initialized()
    start_ray(cfg.ray_address)
    try:
        return train(cfg, backend_factory=lambda cfg: RayRollouts(make_workers(cfg, cfg.workers)))
    finally:
        if started:
            ray.shutdown()
