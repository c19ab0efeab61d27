"""Mixture sampling: which source's unit comes next, deterministic and resumable.

    probs = mixture_probs({"bible": 0.5, "python": 0.5}, mean_unit_tokens)
    sampler = MixtureSampler([n_bible_units, n_python_units], probs, seed=0)
    source, unit = sampler.next()

Weights are shares of *tokens*: a source with weight w gets about w of the packed tokens, so
its units are drawn with probability ∝ w / (mean tokens per unit).

The k-th draw's source is a pure function of (seed, stream, k): uniform numbers come in blocks
of BLOCK from numpy's PCG64 seeded with [seed, stream, block]. Within a source, units are
visited in a fresh permutation every epoch, seeded with [seed, stream, source, epoch], so every
unit is seen once per epoch of its source. The whole state is a few integers (k, and per
source its epoch and position), which `state_dict` returns and `load_state_dict` restores.
"""

from __future__ import annotations

import numpy as np

BLOCK = 4096


def mixture_probs(weights: list[float], mean_unit_tokens: list[float]) -> np.ndarray:
    """Per-unit draw probabilities that give each source its weight's share of tokens."""
    w = np.asarray(weights, dtype=np.float64)
    m = np.asarray(mean_unit_tokens, dtype=np.float64)
    if w.shape != m.shape or (w < 0).any() or w.sum() <= 0 or (m <= 0).any():
        raise ValueError(f"bad mixture: weights {weights}, mean unit tokens {mean_unit_tokens}")
    p = w / m
    return p / p.sum()


class MixtureSampler:
    def __init__(self, n_units: list[int], probs, seed: int, stream: int = 0):
        self.n_units = [int(n) for n in n_units]
        self.probs = np.asarray(probs, dtype=np.float64)
        if len(self.n_units) != len(self.probs):
            raise ValueError("one probability per source is needed")
        for n, p in zip(self.n_units, self.probs):
            if p > 0 and n == 0:
                raise ValueError("a source with a positive weight has no units")
        self.cdf = np.cumsum(self.probs / self.probs.sum())
        self.cdf[-1] = 1.0
        self.seed, self.stream = int(seed), int(stream)
        self.k = 0
        self.epoch = [0] * len(self.n_units)
        self.pos = [0] * len(self.n_units)
        self._block: tuple[int, np.ndarray] | None = None
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def _source_of(self, k: int) -> int:
        b = k // BLOCK
        if self._block is None or self._block[0] != b:
            u = np.random.default_rng([self.seed, self.stream, b]).random(BLOCK)
            self._block = (b, np.searchsorted(self.cdf, u, side="right"))
        return int(min(self._block[1][k % BLOCK], len(self.cdf) - 1))

    def _perm(self, s: int) -> np.ndarray:
        e = self.epoch[s]
        cached = self._perms.get(s)
        if cached is None or cached[0] != e:
            perm = np.random.default_rng([self.seed, self.stream, 1000 + s, e]).permutation(self.n_units[s])
            self._perms[s] = cached = (e, perm)
        return cached[1]

    def next(self) -> tuple[int, int]:
        """(source index, unit index) of the next draw."""
        s = self._source_of(self.k)
        self.k += 1
        unit = int(self._perm(s)[self.pos[s]])
        self.pos[s] += 1
        if self.pos[s] == self.n_units[s]:
            self.epoch[s] += 1
            self.pos[s] = 0
        return s, unit

    def epochs(self) -> list[float]:
        """Epochs completed per source (fractional)."""
        return [e + p / max(n, 1) for e, p, n in zip(self.epoch, self.pos, self.n_units)]

    def state_dict(self) -> dict:
        return {"k": self.k, "epoch": list(self.epoch), "pos": list(self.pos)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["epoch"]) != len(self.n_units) or len(state["pos"]) != len(self.n_units):
            raise ValueError("sampler state is for a different number of sources")
        self.k = int(state["k"])
        self.epoch = [int(e) for e in state["epoch"]]
        self.pos = [int(p) for p in state["pos"]]
