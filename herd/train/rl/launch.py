"""Ray launcher for `herd rl`: the rollout workers and the learner are Ray actors; weights travel
through Ray's object store.

The only module that imports Ray. The worker is herd.train.rl.actor.RolloutWorker unchanged and
the learner is herd.train.rl.learner.train unchanged, each wrapped in a thin Ray actor (torchtitan's
experiments/rl layout: plain classes tested in one process, Ray in one launcher). Topology:

    driver (herd rl)          starts or joins Ray, creates the actors, draws the progress bar
      ├─ RayLearner           the shared loop: optimizer, checkpoints, metrics.jsonl, run directory
      │    per update:  ref = ray.put(to_wire(state_dict))        # numpy: one memcpy into the store
      │                 worker.set_weights.remote(ref, version)   # its own thread: pending, switched
      │                                                           # to when the next request starts
      │                 worker.rollout.remote(index, ids, G, pixel_values, min_version)
      │                                                           # → Rollout(version it ran on)
      ├─ RayRolloutWorker 0   herd's Engine on its own copy of the policy
      └─ RayRolloutWorker 1 …

Workers keep generating while the learner trains (when max_staleness > 0 the learner queues about
one step's worth of groups ahead); the learner's StalenessBuffer drops whatever comes back older
than the bound. Weights do not queue behind rollouts: a worker takes the newest published version
at the start of each request, so requests queued before an update run on the update (a request
also names the learner's version when it was sent, and waits for those weights if they are still
in transit: at --max-staleness 0 nothing can start on the previous version). The learner actor
is placed on the driver's node (soft affinity), so the run directory it writes is the one the
driver named; it reports (step, metrics) to the driver, which draws the bar; an error raised in
it (a bad --tasks, ConstantRewardError) reaches the CLI as the same exception.

Faults: workers are created with `max_restarts=-1`; when one dies (OOM, SIGKILL, a lost node)
its pending requests fail with a RayActorError, Ray restarts it from its constructor (initial
weights, version 0), and the learner re-sends the newest weights and the failed requests to it
while the other workers carry on (`workers/restarts` counts these). The learner is not restarted
(`max_restarts=0`): the run stops and `--resume` continues from its last crash-safe checkpoint.
A local run starts Ray on this machine's cores without the dashboard; `--ray-address` joins an
existing cluster and the same code runs there (workers may then sit on other machines: they load
--init themselves, so the directory must be reachable there).

Not here (no GPU on this machine to test it): weight sync by a torch.distributed (NCCL) broadcast
group and an FSDP2-sharded learner across GPUs. On CPU the object store is the transport, and
`--workers` actors each hold a full copy of the policy.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from herd.train.rl.actor import Rollout


def _worker_class():
    import ray

    from herd.train.rl.actor import RolloutWorker

    # two concurrency groups, one thread each: weights arrive (and are deserialised) on their own thread
    # while a rollout runs on the default one; the worker switches to them when its next request starts
    @ray.remote(max_restarts=-1, max_task_retries=0, concurrency_groups={"weights": 1})
    class RayRolloutWorker:
        def __init__(self, init: str, max_new_tokens: int, temperature: float, seed: int, worker_id: int):
            torch.set_num_threads(1)
            from herd.train.loop import init_from

            model, tok = init_from(init)
            self.worker = RolloutWorker(model, tok, max_new_tokens=max_new_tokens, temperature=temperature,
                                        seed=seed, worker_id=worker_id)

        @ray.method(concurrency_group="weights")
        def set_weights(self, state_dict, version: int) -> int:
            return self.worker.offer_weights(from_wire(state_dict), version)

        def rollout(self, prompt_index: int, prompt_ids: list[int], n: int, pixel_values=None,
                    min_version: int = 0) -> Rollout:
            return self.worker.rollout(prompt_index, prompt_ids, n, pixel_values, min_version)

        def pid(self) -> int:
            return os.getpid()

    return RayRolloutWorker


def _learner_class():
    import ray

    # max_concurrency=2: `progress` answers while `run` trains (run holds one thread, progress the other)
    @ray.remote(max_restarts=0, max_concurrency=2)
    class RayLearner:
        def __init__(self):
            self.step, self.stats = 0, {}

        def run(self, cfg, workers: list) -> dict:
            from herd.train.rl.learner import train

            torch.set_num_threads(cfg.threads or 1)

            def on_step(step, stats):
                self.step, self.stats = step, stats

            return train(cfg, backend_factory=lambda cfg: RayRollouts(workers), on_step=on_step)

        def progress(self) -> tuple[int, dict]:
            return self.step, self.stats

        def pid(self) -> int:
            return os.getpid()

    return RayLearner


def to_wire(state_dict: dict) -> dict:
    """Weights as numpy arrays for the object store: Ray writes an array into shared memory with one
    memcpy and a worker reads it back without a copy (a torch tensor is pickled through its storage:
    measured here 0.24–0.30 s of CPU to put the 75 MB tiny model and ~0.3 s to read it back, against
    0.04–0.07 s and 0.01 s as arrays). bf16 has no numpy dtype and travels as a tensor."""
    return {k: v.detach().cpu() if v.dtype == torch.bfloat16 else v.detach().cpu().numpy()
            for k, v in state_dict.items()}


def from_wire(state_dict: dict) -> dict:
    """The worker's side: tensors over the object store's read-only arrays (no copy; load_state_dict
    copies them into the model and never writes to them)."""
    import warnings

    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given NumPy array is not writable"
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state_dict.items()}


class RayRollouts:
    """The learner's rollout backend over Ray actors (same interface as actor.LocalRollouts)."""

    def __init__(self, workers: list):
        self.workers = workers
        self.pending: dict = {}  # ObjectRef → (worker index, request)
        self.latest = None       # (object ref of the newest weights, version)
        self.restarts = 0

    def publish(self, state_dict: dict, version: int) -> None:
        import ray

        ref = ray.put(to_wire(state_dict))
        self.latest = (ref, version)
        for w in self.workers:
            w.set_weights.remote(ref, version)

    def _send(self, w: int, request: tuple) -> None:
        # the request runs on the newest weights the worker holds when it starts, never older than
        # the learner's version now (the worker waits for weights still on their way)
        floor = self.latest[1] if self.latest is not None else 0
        self.pending[self.workers[w].rollout.remote(*request, floor)] = (w, request)

    def submit(self, prompt_index: int, prompt_ids: list[int], n: int, pixel_values=None) -> None:
        load = [0] * len(self.workers)
        for w, _ in self.pending.values():
            load[w] += 1
        self._send(min(range(len(self.workers)), key=load.__getitem__), (prompt_index, prompt_ids, n, pixel_values))

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


def cpu_share(n_workers: int) -> float:
    """CPUs per actor: the cluster's CPUs split evenly between the workers and the learner."""
    import ray

    return max(1.0, float(ray.available_resources().get("CPU", 1))) / (n_workers + 1)


def make_workers(cfg, n: int, cpus: float | None = None) -> list:
    cls = _worker_class()
    import ray

    cpus = cpus or cpu_share(n)
    workers = [cls.options(num_cpus=cpus).remote(cfg.init, cfg.max_new_tokens, cfg.temperature, cfg.seed, i)
               for i in range(n)]
    ray.get([w.pid.remote() for w in workers])  # wait until each has loaded its model (not counted as training)
    return workers


def make_learner(cpus: float):
    """The learner actor, on the driver's node (soft: elsewhere if that node has no room)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return _learner_class().options(num_cpus=cpus, scheduling_strategy=here).remote()


def run_learner(cfg, learner, workers: list, poll_s: float = 0.5) -> dict:
    """Run the learner actor to the end, drawing the progress bar here from its reports."""
    import ray
    from ray.exceptions import RayTaskError

    done = learner.run.remote(dataclasses.replace(cfg, progress=False), workers)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, desc="rl", unit="step", dynamic_ncols=True)
    try:
        while not ray.wait([done], timeout=poll_s)[0]:
            if bar is not None:
                step, s = ray.get(learner.progress.remote())
                if step and s:
                    bar.n = step
                    bar.set_postfix(reward=f"{s['reward']:.3f}", samples_s=f"{s['samples_per_s']:.1f}",
                                    staleness=f"{s['staleness/mean']:.2f}", hard=int(s["pool/hard"]))
        return ray.get(done)
    except RayTaskError as e:  # the learner's own exception (ValueError → the CLI's one-line exit 2)
        raise (e.cause if isinstance(e.cause, Exception) else e) from None
    finally:
        if bar is not None:
            bar.close()


def launch(cfg) -> dict:
    """`herd rl` with --workers N ≥ 1: N rollout-worker actors and a learner actor. Ray is shut down
    on exit if this call started it."""
    import ray

    started = not ray.is_initialized()
    start_ray(cfg.ray_address)
    try:
        cpus = cpu_share(cfg.workers)  # before the actors take theirs
        workers = make_workers(cfg, cfg.workers, cpus)
        return run_learner(cfg, make_learner(cpus), workers)
    finally:
        if started:
            ray.shutdown()
