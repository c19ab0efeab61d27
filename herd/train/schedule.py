"""Learning-rate schedules: linear warmup, then cosine decay or warmup-stable-decay (WSD).

Each returns the multiplier of the peak learning rate at a step (pure function of the step, so a
resumed run needs no scheduler state beyond the step counter).
"""

from __future__ import annotations

import math


def lr_multiplier(step: int, total: int, warmup: int, kind: str = "cosine", min_ratio: float = 0.1,
                  decay_fraction: float = 0.2) -> float:
    """Multiplier in [min_ratio, 1] for `step` (0-based) of `total` steps.

    cosine: warmup, then cosine from 1 down to min_ratio at the last step.
    wsd:    warmup, hold at 1, then linear decay to min_ratio over the last `decay_fraction` of steps.
    """
    if total <= 0:
        raise ValueError("total steps must be positive")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "cosine":
        span = max(1, total - warmup - 1)
        t = min(1.0, (step - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if kind == "wsd":
        decay_steps = max(1, int(round(total * decay_fraction)))
        start = total - decay_steps
        if step < start:
            return 1.0
        t = min(1.0, (step - start + 1) / decay_steps)
        return 1.0 - (1 - min_ratio) * t
    if kind == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {kind!r} (cosine, wsd or constant)")
