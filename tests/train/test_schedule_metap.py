"""LR schedules and MetaP: multipliers per parameter group, init scales, the ablation."""

from __future__ import annotations

import math

import pytest
import torch

import herd
from herd.model.rope import rope_angles
from herd.train import metap
from herd.train.schedule import lr_multiplier
from tests.conftest import model_config


def test_cosine_and_wsd_shapes():
    total, warm = 100, 10
    cos = [lr_multiplier(s, total, warm, "cosine", 0.1) for s in range(total)]
    assert cos[0] == pytest.approx(0.1) and cos[warm - 1] == pytest.approx(1.0)
    assert cos[-1] == pytest.approx(0.1) and all(a >= b - 1e-12 for a, b in zip(cos[warm:], cos[warm + 1:]))
    wsd = [lr_multiplier(s, total, warm, "wsd", 0.0, 0.2) for s in range(total)]
    assert wsd[50] == 1.0 and wsd[79] == 1.0 and wsd[-1] == pytest.approx(0.0) and 0 < wsd[90] < 1
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier(0, 10, 0, "linear")


def _model(hidden, layers=4):
    heads = hidden // 16
    return herd.build_model(model_config(vision=True, text=dict(
        hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads // 2, num_hidden_layers=layers,
        intermediate_size=2 * hidden, intermediate_size_mlp=4 * hidden)), seed=0)


def test_param_groups_multipliers_and_decay():
    cfg = metap.MetaPConfig(base_width=64)
    m = _model(128)
    groups = metap.param_groups(m, lr=1e-2, weight_decay=0.1, cfg=cfg)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["language_model.model.layers.0.self_attn.q_proj.weight"]["lr_mult"] == pytest.approx(0.5)
    assert by_name["language_model.model.layers.1.feed_forward.experts.gate_up_proj"]["lr_mult"] == pytest.approx(0.5)
    assert by_name["language_model.lm_head.weight"]["lr_mult"] == pytest.approx(0.5)
    assert by_name["language_model.model.embed_tokens.weight"]["lr_mult"] == 1.0
    assert by_name["language_model.model.norm.weight"]["weight_decay"] == 0.0
    assert by_name["language_model.model.layers.0.self_attn.q_proj.weight"]["weight_decay"] == 0.1
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(m.parameters()))
    off = metap.param_groups(m, lr=1e-2, cfg=cfg, enabled=False)
    assert {g["lr_mult"] for g in off} == {1.0}


def test_vision_lr_mult_scales_only_the_vision_tower_and_projector():
    m = _model(128)
    base = {n: g["lr_mult"] for g in metap.param_groups(m, lr=1e-2, cfg=metap.MetaPConfig(base_width=64))
            for n in g["names"]}
    cfg = metap.MetaPConfig(base_width=64, vision_lr_mult=0.1)
    by_name = {n: g["lr_mult"] for g in metap.param_groups(m, lr=1e-2, cfg=cfg) for n in g["names"]}
    vision = [n for n in by_name if n.startswith(("vision_model.", "multi_modal_projector."))]
    assert vision and all(by_name[n] == pytest.approx(0.1 * base[n]) for n in vision)
    assert all(by_name[n] == base[n] for n in by_name if n not in vision)
    assert by_name["vision_model.class_embedding"] == pytest.approx(0.1)  # vectors too, not only matrices
    from herd.train.loop import LoopConfig

    with pytest.raises(ValueError, match="--vision-lr-mult must be >= 0"):
        LoopConfig(vision_lr_mult=-1.0).validate()


def test_batch_size_rule():
    cfg = metap.MetaPConfig(base_width=64, base_batch_tokens=1000)
    groups = metap.param_groups(_model(64), lr=1.0, cfg=cfg, batch_tokens=4000)
    assert {round(g["lr_mult"], 6) for g in groups} == {2.0}


def test_init_scales_follow_fan_in_and_depth():
    cfg = metap.MetaPConfig(base_width=64, base_layers=4)
    for hidden, layers in ((64, 4), (256, 4), (64, 16)):
        m = _model(hidden, layers)
        metap.init_metap(m, cfg, generator=torch.Generator().manual_seed(0))
        p = dict(m.named_parameters())
        q = p["language_model.model.layers.0.self_attn.q_proj.weight"]
        assert q.std().item() == pytest.approx(1 / math.sqrt(hidden), rel=0.1)
        o = p["language_model.model.layers.0.self_attn.o_proj.weight"]
        fan_in = o.shape[1]
        assert o.std().item() == pytest.approx(1 / math.sqrt(fan_in) / math.sqrt(2 * layers / 4), rel=0.1)
        head = p["language_model.lm_head.weight"]
        assert head.std().item() == pytest.approx(math.sqrt(64) / hidden, rel=0.1)
        assert p["language_model.model.embed_tokens.weight"].std().item() == pytest.approx(1.0, rel=0.1)
        assert torch.all(p["language_model.model.norm.weight"] == 1)


def test_metap_init_residual_stream_is_width_independent_and_logits_shrink():
    """μP at init: the residual stream keeps its scale across widths; logits shrink as 1/√width."""
    stream, logits = [], []
    for hidden in (64, 256):
        m = _model(hidden)
        metap.init_metap(m, metap.MetaPConfig(base_width=64), generator=torch.Generator().manual_seed(0))
        ids = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(1))
        pos = torch.arange(32)
        rope = rope_angles(pos, m._inv_freq)
        with torch.no_grad():
            h = m.embed(ids)
            for layer in m.layers:
                h = layer(h, pos, rope)
            stream.append(h.pow(2).mean().sqrt().item())
            logits.append(m.language_model.lm_head(m.language_model.model.norm(h)).std().item())
    assert 0.5 < stream[1] / stream[0] < 2.0, stream
    assert logits[1] / logits[0] == pytest.approx(0.5, rel=0.25), logits  # √(64/256)
