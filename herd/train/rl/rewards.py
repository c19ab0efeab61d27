"""Rewards as plain callables with TRL's calling convention.

A reward function takes keyword arguments — `prompts` (list[str]), `completions` (list[str]), and
every column of the dataset row each completion was sampled for (here the chat-data columns of
herd.data.chat_data: `answer`, `verifier`, `entry`, `task`, `id`) as lists — and returns one
float per completion, or None where it does not apply (TRL's `trl/rewards/accuracy_rewards.py`):

    >>> correctness(prompts=["4 - 1 ="], completions=["3"], verifier=["last_number"], answer=["3"])
    [1.0]
    >>> format_reward(completions=["3", "3\\n\\nand more"])
    [1.0, 0.0]

`score(funcs, weights, ...)` combines them as TRL does (weighted sum, None skipped; a completion
no function applies to is None and is left out of its group). A function that raises is retried
one completion at a time, so only the completions that make it raise score None; the failures
are counted (`rewards/errors`) and the run goes on.
"""

from __future__ import annotations

import math
from typing import Callable

RewardFn = Callable[..., list]


def correctness(prompts, completions, verifier=None, answer=None, entry=None, **_) -> list[float | None]:
    """1.0 when the task's verifier (herd.data.chat_data.verify) fully accepts the completion, else
    0.0 (reasoning-gym's partial credit for a wrong answer, 0.01, counts as wrong: a pass/fail
    reward, as TRL's accuracy_reward); None for rows without a verifier."""
    from herd.data.chat_data import verify

    n = len(completions)
    verifier, answer, entry = verifier or [None] * n, answer or [None] * n, entry or [None] * n
    out = []
    for c, v, a, e in zip(completions, verifier, answer, entry):
        s = verify({"verifier": v, "answer": a, "entry": e}, c)
        out.append(None if s is None else float(s >= 1.0))
    return out


def format_reward(completions, max_chars: int = 200, **_) -> list[float]:
    """1.0 for a short, single-paragraph, non-empty answer (the SFT data's answer format), else 0.0."""
    out = []
    for c in completions:
        text = c.strip()
        out.append(float(bool(text) and "\n\n" not in text and len(text) <= max_chars and "<|" not in text))
    return out


REWARDS: dict[str, RewardFn] = {"correctness": correctness, "format": format_reward}


def _call(fn: RewardFn, prompts: list[str], completions: list[str], columns: dict[str, list]) -> tuple[list, int]:
    """fn over the batch; if it raises, one completion at a time. Returns (scores, number that raised)."""
    try:
        scores = list(fn(prompts=prompts, completions=completions, **columns))
        if len(scores) != len(completions):
            raise ValueError(f"reward {getattr(fn, '__name__', fn)} returned {len(scores)} scores "
                             f"for {len(completions)} completions")
        return scores, 0
    except Exception:
        scores, errors = [], 0
        for i in range(len(completions)):
            try:
                scores.append(fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
                                 **{k: v[i:i + 1] for k, v in columns.items()})[0])
            except Exception:
                scores.append(None)
                errors += 1
        return scores, errors


def score(funcs: dict[str, RewardFn], weights: dict[str, float], prompts: list[str], completions: list[str],
          columns: dict[str, list]) -> tuple[list[float | None], dict[str, list], int]:
    """Weighted sum over reward functions → (total per completion or None, per-function scores, errors)."""
    per_fn, errors = {}, 0
    for name, fn in funcs.items():
        per_fn[name], e = _call(fn, prompts, completions, columns)
        errors += e
    totals = []
    for i in range(len(completions)):
        vals = [(weights.get(n, 1.0), per_fn[n][i]) for n in funcs]
        vals = [(w, float(v)) for w, v in vals if v is not None and not math.isnan(float(v))]
        totals.append(sum(w * v for w, v in vals) if vals else None)
    return totals, per_fn, errors
