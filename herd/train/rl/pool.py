"""The prompt pool: keep training on the prompts the current model finds medium-to-hard.

Llama 4's online RL "alternates training and using the model to filter and keep only
medium-to-hard prompts" and drops zero-advantage prompts. Here every prompt's pass rate comes from
its own rollouts (the fraction of its last `window` groups' completions that passed), and its
state follows:

    new ──rollout──▶ hard      pass rate in (0, τ]           drawn at weight 1
                     solved    pass rate 1                   retired (never drawn again)
                     easy      pass rate in (τ, 1)           retired
                     unsolved  pass rate 0                   rests `cooldown` draws, then is
                                                             retried at weight `unsolved_weight`

New prompts are drawn at weight 1 (their difficulty is unknown until tried). A later rollout can
move a prompt between hard and unsolved; retirement is final (prime-rl's DifficultyPoolSampler
keeps pools by the last mean reward; Llama 4 drops easy data outright).

Running out is not an error: `draw(n)` returns what is eligible (the learner warns about a short
batch); when nothing is eligible, resting unsolved prompts are retried early. The state
(per-prompt history, states, the RNG) is saved in every checkpoint.
"""

from __future__ import annotations

import random
from collections import Counter

STATES = ("new", "hard", "unsolved", "easy", "solved")


class PromptPool:
    def __init__(self, n_prompts: int, tau: float = 0.75, window: int = 2, unsolved_weight: float = 0.25,
                 cooldown: int = 4, seed: int = 0):
        if n_prompts <= 0:
            raise ValueError("the prompt pool is empty: no prompts with a verifier")
        if not 0 < tau < 1:
            raise ValueError(f"--tau must be in (0, 1), got {tau}")
        self.tau, self.window, self.unsolved_weight, self.cooldown = tau, window, unsolved_weight, cooldown
        self.state = ["new"] * n_prompts
        self.history: list[list[float]] = [[] for _ in range(n_prompts)]  # pass rate of each recent group
        self.rest_until = [0] * n_prompts  # draw counter before which an unsolved prompt is not drawn
        self.draws = 0
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.state)

    def pass_rate(self, i: int) -> float | None:
        h = self.history[i]
        return sum(h) / len(h) if h else None

    def update(self, i: int, passed: list[bool]) -> str:
        """Record one group's outcomes for prompt i; returns its new state."""
        if self.state[i] in ("easy", "solved") or not passed:
            return self.state[i]
        self.history[i] = (self.history[i] + [sum(passed) / len(passed)])[-self.window:]
        p = self.pass_rate(i)
        if p == 1.0:
            self.state[i] = "solved"
        elif p > self.tau:
            self.state[i] = "easy"
        elif p == 0.0:
            self.state[i] = "unsolved"
            self.rest_until[i] = self.draws + self.cooldown
        else:
            self.state[i] = "hard"
        return self.state[i]

    def _weights(self, early: bool) -> list[tuple[int, float]]:
        out = []
        for i, s in enumerate(self.state):
            if s in ("new", "hard"):
                out.append((i, 1.0))
            elif s == "unsolved" and (early or self.rest_until[i] <= self.draws):
                out.append((i, self.unsolved_weight))
        return out

    def draw(self, n: int, exclude: set[int] = frozenset()) -> list[int]:
        """Up to n distinct eligible prompts (weighted, without replacement); fewer (even none) when
        fewer are eligible — the caller decides how to report a short batch."""
        cands = [(i, w) for i, w in self._weights(early=False) if i not in exclude]
        if not cands:
            cands = [(i, w) for i, w in self._weights(early=True) if i not in exclude]
        # weighted sampling without replacement (Efraimidis–Spirakis: key u^(1/w), take the n largest)
        keyed = sorted(cands, key=lambda iw: self.rng.random() ** (1.0 / iw[1]), reverse=True)
        picked = [i for i, _ in keyed[:n]]
        self.draws += 1
        return picked

    def counts(self) -> dict[str, int]:
        c = Counter(self.state)
        return {s: c.get(s, 0) for s in STATES}

    def describe(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.counts().items())

    def state_dict(self) -> dict:
        return {"state": list(self.state), "history": [list(h) for h in self.history],
                "rest_until": list(self.rest_until), "draws": self.draws, "rng": self.rng.getstate()}

    def load_state_dict(self, s: dict) -> None:
        if len(s["state"]) != len(self.state):
            raise ValueError(f"checkpoint's prompt pool has {len(s['state'])} prompts, this run has "
                             f"{len(self.state)}: resume with the same --tasks")
        self.state, self.history = list(s["state"]), [list(h) for h in s["history"]]
        self.rest_until, self.draws = list(s["rest_until"]), s["draws"]
        self.rng.setstate(s["rng"])
