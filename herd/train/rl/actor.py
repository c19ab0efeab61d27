"""The actor side of online RL: rollout workers, the `generate` callable, the staleness-bounded buffer.

Everything here is a plain class that runs (and is tested) in one process; herd.train.rl.launch
wraps the worker in a Ray actor without changing it (torchtitan's experiments/rl layout).

    generate: GenerateFn = worker.generate             # async (prompt ids, n) → (completions, version)
    group = await rollout(generate, index, prompt_ids, n=8)   # one prompt's G completions
    buffer.put(group, learner_version)                  # admitted only while staleness ≤ K
    group = buffer.take(learner_version)                # re-checked on the way out

The rollout code never knows what stands behind `generate`: here a `RolloutWorker` running
herd's continuous-batching Engine (the G completions of a group decode as one batch), in a Ray
actor the same worker, and it could be an HTTP client. Every completion carries the log-prob the
sampler assigned to each of its tokens (the behaviour policy μ) and the policy version that
produced it: the learner's clipped ratio π_θ/μ is the staleness correction, and `mismatch_kl`
compares μ with the learner's own forward.

Versions: the learner's version is its number of optimizer steps; it publishes weights after each
one and workers switch between requests (a request runs entirely on one version). A group is
`learner_version − group.version` versions stale; the buffer admits it only while that is ≤
`max_staleness` and checks again when the learner takes it, so no older sample reaches the loss.
`max_staleness=0` is synchronous training through the same code.

Sampling: temperature 1, no top-k/top-p by default, so the tokens are drawn from exactly the
distribution whose log-probs the Engine reports and the learner recomputes (TRL's defaults too).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import torch


@dataclass
class Completion:
    token_ids: list[int]          # sampled tokens, the stop token included when the model stopped
    logprobs: list[float]         # behaviour log-prob of each sampled token
    text: str                     # decoded reply (stop token excluded)
    finish_reason: str            # "stop" (the model ended its turn) | "length" (truncated)


@dataclass
class Rollout:
    """One group: a prompt's G completions, all sampled by one policy version."""

    prompt_index: int
    prompt_ids: list[int]
    completions: list[Completion]
    version: int
    worker: int = 0
    rewards: list = field(default_factory=list)  # filled by the learner's scoring
    gen_s: float = 0.0                            # seconds the worker spent generating it (the timeline)


GenerateFn = Callable[..., Awaitable[tuple[list[Completion], int]]]  # (prompt ids, n, pixel_values=None)


async def rollout(generate: GenerateFn, prompt_index: int, prompt_ids: list[int], n: int, worker: int = 0,
                  pixel_values: torch.Tensor | None = None) -> Rollout:
    """Sample one group through any `generate` callable (pixel_values: the prompt's image tiles)."""
    completions, version = await (generate(prompt_ids, n) if pixel_values is None
                                  else generate(prompt_ids, n, pixel_values=pixel_values))
    return Rollout(prompt_index, list(prompt_ids), completions, version, worker)


class RolloutWorker:
    """Generates groups with herd's Engine on its own copy of the policy; weights arrive by version."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 16, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, max_batch: int = 8, seed: int = 0, worker_id: int = 0):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.max_batch = max_batch
        self.worker_id = worker_id
        self.version = 0
        self.rng = random.Random(seed * 1_000_003 + worker_id)
        self.eos = set(model.config.text.eos_token_ids)
        self._pending: tuple[dict, int] | None = None  # newest offered weights, not yet switched to
        self._arrived = threading.Condition()

    def set_weights(self, state_dict: dict, version: int) -> int:
        """Switch to a published policy now (between requests). Older versions than the current are ignored."""
        if version >= self.version:
            with torch.no_grad():
                self.model.load_state_dict(state_dict, strict=True)
            self.version = version
        return self.version

    def offer_weights(self, state_dict: dict, version: int) -> int:
        """Hand over a published policy from another thread while a request may be running: kept as
        pending (only the newest) and switched to when the next request starts, so requests already
        queued run on the newest weights, not on the version current when they were queued. Returns
        the newest version this worker holds or has pending."""
        with self._arrived:
            if version > max(self.version, self._pending[1] if self._pending else -1):
                self._pending = (state_dict, version)
                self._arrived.notify_all()
            return max(self.version, self._pending[1] if self._pending else -1)

    def _switch(self, min_version: int, timeout: float = 600.0) -> None:
        """Before a request: take the pending weights, waiting for them if the request needs a newer
        version than this worker has (its weights are still on the way: a Ray actor resolves them in
        another thread)."""
        with self._arrived:
            if not self._arrived.wait_for(
                    lambda: max(self.version, self._pending[1] if self._pending else -1) >= min_version, timeout):
                raise RuntimeError(f"rollout worker {self.worker_id}: weights version {min_version} never arrived "
                                   f"(holding {self.version}) within {timeout:.0f} s")
            pending, self._pending = self._pending, None
        if pending is not None:
            self.set_weights(*pending)

    async def generate(self, prompt_ids: list[int], n: int,
                       pixel_values: torch.Tensor | None = None) -> tuple[list[Completion], int]:
        """n completions of one prompt, decoded together → (completions, policy version).
        pixel_values [n_tiles, 3, S, S]: the prompt's images, encoded once and shared by the n."""
        from herd.inference import Engine, SamplingParams

        version = self.version
        engine = Engine(self.model, max_batch=min(self.max_batch, n), tokenizer=None,
                        max_seq_len=len(prompt_ids) + self.max_new_tokens + 1)
        with torch.no_grad():
            features = self.model.encode_images(pixel_values) if pixel_values is not None else None  # [n·t, H]
        for i in range(n):
            engine.add(prompt_ids, SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                                  top_k=self.top_k, top_p=self.top_p, logprobs=0,
                                                  seed=self.rng.getrandbits(62)), image_features=features, seq_id=i)
        toks, lps, reasons = [[] for _ in range(n)], [[] for _ in range(n)], [None] * n
        with torch.no_grad():
            for ev in engine.run():
                if ev.token is not None:
                    toks[ev.seq_id].append(ev.token)
                    lps[ev.seq_id].append(float(ev.logprob))
                if ev.finish_reason is not None:
                    reasons[ev.seq_id] = ev.finish_reason
        out = []
        for t, lp, reason in zip(toks, lps, reasons):
            text_ids = t[:-1] if t and t[-1] in self.eos else t
            out.append(Completion(t, lp, self.tokenizer.decode(text_ids), reason or "length"))
        return out, version

    def rollout(self, prompt_index: int, prompt_ids: list[int], n: int,
                pixel_values: torch.Tensor | None = None, min_version: int = 0) -> Rollout:
        """The synchronous entry point (what a Ray actor method calls): switch to the newest offered
        weights (at least `min_version`, the learner's version when it sent the request), then sample."""
        self._switch(min_version)
        t = time.perf_counter()
        r = asyncio.run(rollout(self.generate, prompt_index, prompt_ids, n, self.worker_id, pixel_values))
        r.gen_s = time.perf_counter() - t
        return r


class StalenessBuffer:
    """Finished groups waiting for the learner, admitted only while version staleness ≤ max_staleness."""

    def __init__(self, max_staleness: int, capacity: int):
        if max_staleness < 0:
            raise ValueError(f"--max-staleness must be ≥ 0, got {max_staleness}")
        self.max_staleness, self.capacity = max_staleness, capacity
        self.items: deque[Rollout] = deque()
        self.dropped_stale = 0  # completions dropped for staleness (cumulative)

    def _fresh(self, r: Rollout, learner_version: int) -> bool:
        if learner_version - r.version > self.max_staleness:
            self.dropped_stale += len(r.completions)
            return False
        return True

    def put(self, r: Rollout, learner_version: int) -> bool:
        if not self._fresh(r, learner_version):
            return False
        if len(self.items) >= self.capacity:
            raise RuntimeError(f"rollout buffer over capacity {self.capacity}: the learner requested more work "
                               "than it consumes")
        self.items.append(r)
        return True

    def take(self, learner_version: int) -> Rollout | None:
        while self.items:
            r = self.items.popleft()
            if self._fresh(r, learner_version):
                return r
        return None

    def __len__(self) -> int:
        return len(self.items)


class LocalRollouts:
    """In-process backend: one worker generates each request as it is submitted (with the weights it
    holds then), so a request submitted before an update comes back one version stale, exactly as it
    would from a busy remote worker."""

    def __init__(self, worker: RolloutWorker):
        self.worker = worker
        self.done: list[Rollout] = []
        self.restarts = 0

    def publish(self, state_dict: dict, version: int) -> None:
        self.worker.set_weights({k: v.detach().clone() for k, v in state_dict.items()}, version)

    def submit(self, prompt_index: int, prompt_ids: list[int], n: int, pixel_values=None) -> None:
        self.done.append(self.worker.rollout(prompt_index, prompt_ids, n, pixel_values))

    def in_flight(self) -> int:
        return len(self.done)

    def ready(self) -> list[Rollout]:
        out, self.done = self.done, []
        return out

    def close(self) -> None:
        pass
