"""MoE load balancing during training, and expert-load statistics.

Two methods, selectable per run:
  * "bias" (default) — auxiliary-loss-free balancing: each MoE layer keeps a per-expert bias that
    is added to the router logits for *selection only*; after every optimizer step it moves by
    `rate` toward balance (up for under-loaded experts, down for over-loaded ones). No gradient
    interference with the language-modelling loss.
  * "aux" — the Switch-Transformer auxiliary loss  coef · E · Σ_e f_e · P_e  with f_e the share
    of tokens routed to expert e and P_e the mean router probability (softmax over the logits).
  * "none" — plain Llama 4 routing.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def moe_modules(model):
    return [m for m in model.modules() if m.__class__.__name__ == "MoE"]


def switch_aux_loss(model) -> torch.Tensor | None:
    """Σ over MoE layers of E · Σ_e f_e · P_e for the last forward (needs model.train())."""
    total = None
    for moe in moe_modules(model):
        logits = moe.last_logits
        if logits is None:
            continue
        E = logits.shape[-1]
        probs = logits.float().softmax(-1).mean(0)  # P_e
        counts = moe.last_counts.float()
        share = counts / counts.sum().clamp(min=1)  # f_e
        loss = E * (share * probs).sum()
        total = loss if total is None else total + loss
    return total


@torch.no_grad()
def update_bias(model, counts_per_layer: list[torch.Tensor], rate: float) -> None:
    """Move each layer's expert bias by `rate` toward balance given token counts since the last update."""
    for moe, counts in zip(moe_modules(model), counts_per_layer):
        counts = counts.float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        moe.expert_bias += rate * torch.sign(counts.mean() - counts)
        moe.expert_bias -= moe.expert_bias.mean()  # only differences matter; keep it centred


def load_stats(counts_per_layer: list[torch.Tensor]) -> dict:
    """Expert-load statistics averaged over MoE layers: min/max share relative to uniform, entropy."""
    if not counts_per_layer:
        return {}
    mins, maxs, ents = [], [], []
    for counts in counts_per_layer:
        c = counts.float()
        E = c.numel()
        share = c / c.sum().clamp(min=1)
        mins.append(float(share.min() * E))
        maxs.append(float(share.max() * E))
        p = share[share > 0]
        ents.append(float(-(p * p.log()).sum() / math.log(E)))
    n = len(counts_per_layer)
    return {"load_min": sum(mins) / n, "load_max": sum(maxs) / n, "load_entropy": sum(ents) / n}


class LoadTracker:
    """Accumulates tokens-per-expert over micro-batches between optimizer steps."""

    def __init__(self, model):
        self.model = model
        self.counts: list[torch.Tensor] | None = None

    def observe(self) -> None:
        new = [m.last_counts.detach().clone() for m in moe_modules(self.model) if m.last_counts is not None]
        if self.counts is None:
            self.counts = new
        else:
            self.counts = [a + b for a, b in zip(self.counts, new)]

    def take(self) -> list[torch.Tensor]:
        counts, self.counts = self.counts or [], None
        return counts
