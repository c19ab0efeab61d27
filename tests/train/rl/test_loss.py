"""GRPO advantages and the clipped token-level objective against float64 references on hand-made groups."""

from __future__ import annotations

import math

import pytest
import torch

from herd.train.rl.loss import clipped_loss, group_advantages, k3, zero_advantage


def ref_advantages(groups, scale):
    out = []
    for g in groups:
        m = sum(g) / len(g)
        sd = math.sqrt(sum((x - m) ** 2 for x in g) / (len(g) - 1))  # unbiased, as TRL's torch.std
        out.append([(x - m) / (sd + 1e-4) if scale == "group" else x - m for x in g])
    return out


GROUPS = [[1.0, 0.0, 0.0, 1.0], [0.2, 0.2, 1.2, 0.0], [0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("scale", ["group", "none"])
def test_advantages_match_float64_reference(scale):
    got = group_advantages(torch.tensor(GROUPS, dtype=torch.float32), scale)
    want = torch.tensor(ref_advantages(GROUPS, scale), dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert got[2].abs().max() == 0  # an all-equal group has zero advantage
    assert zero_advantage(torch.tensor(GROUPS)).tolist() == [False, False, True, False]


def test_advantage_scale_rejects_unknown():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(1, 2), "batch")


def ref_loss(logps, old, adv, mask, el, eh, beta, ref):
    """Token by token in float64: −min(r·A, clip(r)·A) + β·k3, summed over masked tokens."""
    total, n = 0.0, 0
    low = high = 0
    for b in range(len(logps)):
        for t in range(len(logps[b])):
            if not mask[b][t]:
                continue
            r = math.exp(logps[b][t] - old[b][t])
            a = adv[b]
            term = -min(r * a, min(max(r, 1 - el), 1 + eh) * a)
            if beta:
                x = ref[b][t] - logps[b][t]
                term += beta * (math.exp(x) - x - 1)
            total += term
            n += 1
            low += r < 1 - el and a < 0
            high += r > 1 + eh and a > 0
    return total, n, low, high


@pytest.mark.parametrize("el,eh,beta", [(0.2, 0.2, 0.0), (0.2, 0.28, 0.0), (0.1, 0.3, 0.04)])
def test_clipped_loss_matches_float64_reference(el, eh, beta):
    g = torch.Generator().manual_seed(0)
    B, T = 6, 7
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    # ratios spread over [0.5, 1.6] so both clips are exercised
    logps = (old + torch.empty(B, T, dtype=torch.float64).uniform_(math.log(0.5), math.log(1.6), generator=g))
    ref = old + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.2, -0.7, 0.0, 0.9, -1.5, 0.3], dtype=torch.float64)
    mask = torch.ones(B, T)
    mask[0, 5:] = 0
    mask[3, 2:] = 0
    want, n, low, high = ref_loss(logps.tolist(), old.tolist(), adv.tolist(), mask.tolist(), el, eh, beta, ref.tolist())
    x = logps.float().clone().requires_grad_(True)
    loss, count, m = clipped_loss(x, old.float(), adv.float(), mask, el, eh, beta, ref.float() if beta else None)
    assert count == n == int(mask.sum())
    assert abs(float(loss.detach()) - want) < 1e-5 * max(1.0, abs(want))
    assert int(m["clip_ratio/low_mean"]) == low and int(m["clip_ratio/high_mean"]) == high
    assert low > 0 and high > 0
    # the gradient against float64 autograd of the same formula
    x64 = logps.clone().requires_grad_(True)
    r = torch.exp(x64 - old)
    term = -torch.minimum(r * adv[:, None], r.clamp(1 - el, 1 + eh) * adv[:, None])
    if beta:
        term = term + beta * (torch.exp(ref - x64) - (ref - x64) - 1)
    (term * mask.double()).sum().backward()
    loss.backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    # clipped tokens carry no gradient from the surrogate (the KL term still pulls them)
    clipped = ((r < 1 - el) & (adv[:, None] < 0)) | ((r > 1 + eh) & (adv[:, None] > 0))
    if beta == 0:
        assert (x.grad[clipped.detach() & mask.bool()] == 0).all()


def test_on_policy_ratio_one_gives_the_policy_gradient_and_zero_mismatch():
    logps = torch.log(torch.tensor([[0.5, 0.25], [0.1, 0.9]])).requires_grad_(True)
    adv = torch.tensor([1.0, -2.0])
    loss, n, m = clipped_loss(logps, logps.detach(), adv, torch.ones(2, 2))
    loss.backward()
    assert n == 4 and float(m["mismatch_kl"]) == 0.0
    torch.testing.assert_close(logps.grad, -adv[:, None].expand(2, 2))  # ∂(−r·A)/∂logp = −A at r = 1


def test_kl_needs_reference_and_k3_is_nonnegative():
    with pytest.raises(ValueError, match="reference"):
        clipped_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), beta=0.1)
    x = torch.linspace(-3, 3, 61)
    assert (k3(x) >= 0).all() and k3(torch.zeros(1)).item() == 0
