"""MoE load balancing: the bias moves routing toward balance; the aux loss has the Switch form."""

from __future__ import annotations

import torch

from herd.model.moe import MoE
from herd.train import balance
from tests.conftest import text_config


class Holder(torch.nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.moe = moe


def skewed_moe():
    moe = MoE(text_config(num_local_experts=4))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
        moe.router.weight[0] += 0.03  # expert 0 wins for most tokens
    return moe


def test_bias_update_moves_load_toward_balance():
    moe = skewed_moe()
    model = Holder(moe)
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(0)).abs()
    moe(x)
    before = balance.load_stats([moe.last_counts])
    for _ in range(300):
        moe(x)
        balance.update_bias(model, [moe.last_counts], rate=0.01)
    moe(x)
    after = balance.load_stats([moe.last_counts])
    assert before["load_max"] > 2.0
    assert after["load_max"] < 1.5 and after["load_entropy"] > before["load_entropy"] + 0.2
    assert abs(float(moe.expert_bias.mean())) < 1e-6


def test_switch_aux_loss_value_and_gradient():
    moe = skewed_moe().train()
    model = Holder(moe)
    x = torch.randn(256, 64).abs()
    moe(x)
    loss = balance.switch_aux_loss(model)
    E = 4
    probs = moe.last_logits.float().softmax(-1).mean(0)
    share = moe.last_counts.float() / moe.last_counts.sum()
    assert torch.isclose(loss, E * (share * probs).sum())
    assert loss.item() > 1.0  # skewed routing costs more than the balanced value 1
    loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_load_stats_uniform():
    s = balance.load_stats([torch.tensor([5, 5, 5, 5])])
    assert s == {"load_min": 1.0, "load_max": 1.0, "load_entropy": 1.0}
