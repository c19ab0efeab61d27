"""Choosing the next token: greedy, temperature, top-k, top-p, min-p, frequency/presence penalties.

`SamplingParams` describes one request; `sample(logits, rows)` picks the next token for a batch of
rows that may each use different settings. Every step is vectorised over the rows except the
final draw, which uses each row's own seeded generator — so a sequence samples the same tokens
whether it runs alone or batched with others.

Order (as transformers and vLLM apply them): penalties → temperature → top-k → top-p → min-p.
Reported logprobs are the model's own (log-softmax of the raw logits), whatever the sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How one sequence is generated. temperature 0 = greedy (argmax)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off; drop tokens below min_p × the top token's probability
    frequency_penalty: float = 0.0  # subtract penalty × count of the token in the output so far
    presence_penalty: float = 0.0  # subtract penalty once if the token occurs in the output
    seed: int | None = None
    stop_token_ids: list[int] | None = None  # None = the model's eos ids; [] = none
    stop: list[str] = field(default_factory=list)  # stop strings (need a tokenizer)
    logprobs: int | None = None  # None = off; 0 = the chosen token's; k = also the top k

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ValueError(f"invalid sampling parameters: {msg}")

        need(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
             f"max_new_tokens must be a non-negative int, got {self.max_new_tokens!r}")
        need(self.temperature >= 0, f"temperature must be ≥ 0, got {self.temperature}")
        need(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be a non-negative int, got {self.top_k!r}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        need(self.logprobs is None or self.logprobs >= 0, f"logprobs must be None or ≥ 0, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty)


class RowState:
    """Per-sequence sampling state: parameters, random generator, counts of generated tokens."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator()
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()
        self.counts = torch.zeros(vocab_size, dtype=torch.float32) if params.penalized else None

    def observe(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1


@dataclass
class Sampled:
    tokens: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


def sample(logits: torch.Tensor, rows: list[RowState]) -> Sampled:
    """logits [n, vocab] (any float dtype) and one RowState per row → the next token of each row."""
    x = logits.float()
    n = x.shape[0]
    params = [r.params for r in rows]
    want_lp = [p.logprobs is not None for p in params]
    logp = torch.log_softmax(x, -1) if any(want_lp) else None
    pen = [i for i, p in enumerate(params) if p.penalized]
    if pen:
        x = x.clone()
        for i in pen:
            c = rows[i].counts
            x[i] -= params[i].frequency_penalty * c + params[i].presence_penalty * (c > 0).float()
    tokens = x.argmax(-1)  # greedy rows (and a placeholder for the others)
    hot = [i for i, p in enumerate(params) if not p.greedy]
    if hot:
        probs = _filtered_probs(x[hot], [params[i] for i in hot])
        for j, i in enumerate(hot):
            tokens[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]
    out = tokens.tolist()
    lps: list[float | None] = [None] * n
    tops: list[list[tuple[int, float]] | None] = [None] * n
    if logp is not None:
        chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
        for i, p in enumerate(params):
            if p.logprobs is None:
                continue
            lps[i] = chosen[i]
            if p.logprobs > 0:
                v, ix = logp[i].topk(p.logprobs)
                tops[i] = list(zip(ix.tolist(), v.tolist()))
    return Sampled(out, lps, tops)


def _filtered_probs(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p over rows x [m, vocab] → probabilities [m, vocab]."""
    m, V = x.shape
    temp = torch.tensor([p.temperature for p in params], dtype=x.dtype)
    x = x / temp[:, None]
    ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    if min(ks) < V:
        kth = x.topk(max(ks), dim=-1).values.gather(1, torch.tensor(ks)[:, None] - 1)  # [m, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if any(p.top_p < 1 for p in params):
        top_p = torch.tensor([p.top_p for p in params], dtype=x.dtype)
        sx, order = x.sort(-1, descending=True)
        sp = torch.softmax(sx, -1)
        before = sp.cumsum(-1) - sp  # mass of the tokens ranked above
        drop = before >= top_p[:, None]  # never drops the first token
        x = x.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=x.dtype)
        pr = torch.softmax(x, -1)
        x = x.masked_fill(pr < min_p[:, None] * pr.amax(-1, keepdim=True), float("-inf"))
    return torch.softmax(x, -1)
