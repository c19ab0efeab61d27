"""Pruning a MoE to its shared experts (herd.model.prune), checked against an independent
construction of the same function: the MoE model with its routed experts' weights set to zero
(a routed expert with zero weights adds exactly 0, so only the shared expert and the rest remain)."""

from __future__ import annotations

import copy

import pytest
import torch

from herd.model.llama4 import build_model
from herd.model.moe import MoE
from herd.model.prune import prune_to_shared_expert
from herd.presets import get_config


def _tiny(moe_layers=None, layers=2, same_width=True):
    cfg = get_config("tiny")
    t = cfg.text
    t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim = 64, layers, 2, 1, 32
    t.vocab_size, t.intermediate_size, t.num_local_experts = 8192, 48, 4
    t.intermediate_size_mlp = 48 if same_width else 96
    t.no_rope_layers = [1] * (layers - 1) + [0]
    t.attention_chunk_size = 8  # chunked layers and a NoPE layer: the base's attention is kept as is
    if moe_layers is not None:
        t.moe_layers, t.interleave_moe_layer_step = moe_layers, 0
    cfg.vision.vision_output_dim = cfg.vision.projector_input_dim = cfg.vision.projector_output_dim = 64
    model = build_model(cfg, seed=0, init=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1, generator=g)
        for m in model.modules():
            if isinstance(m, MoE):
                m.expert_bias.normal_(0, 1.0, generator=g)
    return model.eval()


def _zero_routed(model):
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        for m in oracle.modules():
            if isinstance(m, MoE):
                m.experts.gate_up_proj.zero_()
                m.experts.down_proj.zero_()
    return oracle


def test_pruned_forward_equals_moe_with_routed_experts_zeroed():
    model = _tiny()
    ids = torch.randint(0, 8000, (2, 21), generator=torch.Generator().manual_seed(2))
    pruned = prune_to_shared_expert(model).eval()
    with torch.no_grad():
        want = _zero_routed(model)(ids)
        got = pruned(ids)
        full = model(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - full).abs().max() > 1e-3  # the routed experts did contribute: the check can fail
    t = pruned.config.text
    assert t.moe_layers == [] and t.num_local_experts == 0 and t.intermediate_size_mlp == 48
    assert not any(isinstance(m, MoE) for m in pruned.modules())
    assert all(not layer.is_moe for layer in pruned.layers)
    assert pruned.vision_model is not None  # kept unless text_only
    assert any(isinstance(m, MoE) for m in model.modules())  # the base is untouched


def test_text_only_drops_vision_and_keeps_text_forward():
    model = _tiny()
    pruned = prune_to_shared_expert(model, text_only=True).eval()
    assert pruned.vision_model is None and pruned.config.vision is None
    assert not any(k.startswith(("vision_model", "multi_modal")) for k in pruned.state_dict())
    ids = torch.randint(0, 8000, (1, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids), _zero_routed(model)(ids), rtol=1e-5, atol=1e-5)


def test_dense_layers_kept_and_mixed_widths_refused():
    model = _tiny(moe_layers=[1], layers=3)
    pruned = prune_to_shared_expert(model).eval()
    torch.testing.assert_close(pruned.layers[0].feed_forward.gate_proj.weight,
                               model.layers[0].feed_forward.gate_proj.weight)
    torch.testing.assert_close(pruned.layers[1].feed_forward.down_proj.weight,
                               model.layers[1].feed_forward.shared_expert.down_proj.weight)
    ids = torch.randint(0, 8000, (1, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids), _zero_routed(model)(ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one dense width"):
        prune_to_shared_expert(_tiny(moe_layers=[1], layers=3, same_width=False))


def test_pruned_model_saves_and_reloads(tmp_path):
    from herd.model.weights import load_model, save_model

    pruned = prune_to_shared_expert(_tiny(), text_only=True).eval()
    save_model(pruned, tmp_path)
    back = load_model(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 8000, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), pruned(ids))
