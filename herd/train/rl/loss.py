"""The GRPO-family objective as pure functions: group advantages and the clipped token loss.

GRPO (DeepSeekMath, arXiv 2402.03300) samples G completions per prompt, scores them, and uses the
group itself as the baseline: A_i = (r_i − mean(r)) / (std(r) + ε). The loss is PPO's clipped
surrogate per completion token against the *behaviour* policy μ that sampled it:

    ratio_t = π_θ(y_t | ·) / μ(y_t | ·)                     (exp of a log-prob difference)
    loss_t  = −min(ratio_t · A,  clip(ratio_t, 1 − ε_low, 1 + ε_high) · A)  [+ β · KL_t(π_θ ‖ π_ref)]

Kept from the field, as parameters of one function (torchtitan's `losses/dapo.py` idea):
  * `scale="group"` divides by the group's std (GRPO, TRL's default `scale_rewards="group"`);
    `scale="none"` keeps r − mean (Dr. GRPO; nanochat and PipelineRL's `divide_advantage_by_std
    false`). std is torch's unbiased std and ε = 1e-4, as TRL computes it.
  * separate ε_low / ε_high (DAPO's clip-higher: 0.2 / 0.28; TRL's default is 0.2 / 0.2);
  * token-level aggregation (DAPO, TRL's default `loss_type="dapo"`): the function returns the
    loss *summed* over completion tokens and the token count; the shared loop divides by the
    tokens of the whole global batch, so long and short completions weigh per token;
  * the KL term (k3 estimator, exp(ref − logp) − (ref − logp) − 1, as TRL and verl's
    `low_var_kl`) only when β > 0; default β = 0 as in TRL (no reference model is loaded).
Asynchrony needs no extra machinery: μ is whatever policy version sampled the tokens, so the
clipped ratio is the staleness correction (AReaL's decoupled objective with proximal = behaviour).

Metrics (sums over tokens here; TRL's names): clip_ratio/low_mean (ratio < 1 − ε_low where A < 0),
clip_ratio/high_mean (ratio > 1 + ε_high where A > 0), clip_ratio/region_mean (either), kl, and
herd's `mismatch_kl`: the k3 estimate of KL(μ ‖ π_θ) over the sampled tokens, before the update
— zero when the sampler and the learner are the same forward on the same weights.
"""

from __future__ import annotations

import torch

ADV_EPS = 1e-4  # TRL: (r - mean) / (std + 1e-4)


def group_advantages(rewards: torch.Tensor, scale: str = "group") -> torch.Tensor:
    """rewards [n_groups, G] → advantages [n_groups, G]. scale: "group" (÷ std + 1e-4) or "none"."""
    if scale not in ("group", "none"):
        raise ValueError(f"advantage scale must be 'group' or 'none', got {scale!r}")
    centred = rewards - rewards.mean(-1, keepdim=True)
    if scale == "none":
        return centred
    return centred / (rewards.std(-1, keepdim=True) + ADV_EPS)


def zero_advantage(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [n_groups, G] → bool [n_groups]: every completion scored the same (nothing to learn)."""
    return (rewards == rewards[:, :1]).all(-1)


def k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(q ‖ p) from log(p/q) at samples of q: e^x − x − 1 ≥ 0."""
    return torch.expm1(log_ratio) - log_ratio


def clipped_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
                 ref_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    """The clipped surrogate summed over completion tokens.

    logps [B, T]: log π_θ of each sampled token (with grad); old_logps [B, T]: behaviour log-probs;
    advantages [B] (one per completion); mask [B, T] (1 on completion tokens); ref_logps [B, T] when
    beta > 0. Returns (loss summed over masked tokens, token count, metric sums over tokens).
    """
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs the reference model's log-probs")
    mask = mask.to(logps.dtype)
    adv = advantages[:, None].to(logps.dtype)                       # [B, 1]
    log_ratio = logps - old_logps                                    # [B, T]
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)           # [B, T]
    metrics = {}
    if beta > 0:
        kl = k3(ref_logps - logps)
        per_token = per_token + beta * kl
        metrics["kl"] = (kl.detach() * mask).sum()
    with torch.no_grad():
        low = ((ratio < 1 - eps_low) & (adv < 0)).to(logps.dtype) * mask
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(logps.dtype) * mask
        metrics["clip_ratio/low_mean"] = low.sum()
        metrics["clip_ratio/high_mean"] = high.sum()
        metrics["clip_ratio/region_mean"] = (low + high).sum()
        metrics["mismatch_kl"] = (k3(log_ratio.detach()) * mask).sum()
    return (per_token * mask).sum(), int(mask.sum()), metrics
