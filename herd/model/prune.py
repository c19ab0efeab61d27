"""Pruning a Llama 4 MoE to a dense model: keep each MoE layer's shared expert as the layer's MLP.

This is how Meta made Llama Guard 4 (12B dense) from Llama 4 Scout (109B MoE): "pruned from
Scout — routed experts and routers dropped, the shared expert kept as the dense MLP", then
fine-tuned (the Llama Guard 4 model card). The result is exactly what the
guard4 preset describes: no MoE layers, every MLP a SwiGLU of the shared expert's width
(`intermediate_size_mlp` = the MoE's `intermediate_size`, 8192 for Scout → Llama Guard 4).

Layout of the change, per decoder layer l:
  MoE layer:   feed_forward.{router, experts.*, shared_expert.*}  →  feed_forward.{gate,up,down}_proj
               (the shared expert's three matrices, unchanged; router and routed experts dropped)
  dense layer: feed_forward.{gate,up,down}_proj kept as they are
Embeddings, attention, norms and the LM head are copied unchanged; the attention settings (RoPE /
NoPE layers, chunking, temperature tuning) are the base's, so the pruned forward is the MoE
forward with the routed experts' contribution removed — the identity tests/model/test_prune.py
checks against a second construction (the MoE model with its routed expert weights set to zero).
The guard4 preset's other differences from Scout (full attention, RoPE on every layer) change the
function and are left to whoever fine-tunes the pruned model.

One config holds one dense width, so a base whose dense layers (`intermediate_size_mlp`) and
shared experts (`intermediate_size`) differ in width (Maverick's shape) cannot be expressed
after pruning: that is a ValueError, not a silent resize.
"""

from __future__ import annotations

import copy

import torch

from herd.model.llama4 import Llama4
from herd.model.moe import MoE


@torch.no_grad()
def prune_to_shared_expert(model: Llama4, text_only: bool = False) -> Llama4:
    """A new dense Llama4 whose every MLP is the base layer's dense MLP or MoE shared expert.

    `model` is not modified. `text_only=True` also drops the vision tower and projector (the
    result saves in the Llama4ForCausalLM layout). The new model has model's dtype and device.
    """
    tc = model.config.text
    moe_ids = [i for i, layer in enumerate(model.layers) if layer.is_moe]
    dense_ids = [i for i in range(len(model.layers)) if i not in moe_ids]
    if moe_ids and dense_ids and tc.intermediate_size != tc.intermediate_size_mlp:
        raise ValueError(f"cannot prune to one dense width: shared experts are {tc.intermediate_size} wide, "
                         f"dense layers {dense_ids} are {tc.intermediate_size_mlp} wide")
    config = copy.deepcopy(model.config)
    t = config.text
    t.moe_layers, t.interleave_moe_layer_step, t.num_local_experts = [], 0, 0
    if moe_ids:
        t.intermediate_size_mlp = tc.intermediate_size
    t.source_keys = None
    if text_only:
        config.vision = None
    config.name = f"{model.config.name or 'model'}-pruned"
    with torch.device("meta"):
        dense = Llama4(config)
    state = {}
    for name, tensor in model.state_dict().items():
        if text_only and name.startswith(("vision_model.", "multi_modal_projector.")):
            continue
        state[name] = tensor
    for i in moe_ids:
        prefix = f"language_model.model.layers.{i}.feed_forward."
        for name in [n for n in state if n.startswith(prefix)]:
            rest = name[len(prefix):]
            tensor = state.pop(name)
            if rest.startswith("shared_expert."):  # shared_expert.gate_proj.weight → gate_proj.weight
                state[prefix + rest[len("shared_expert."):]] = tensor
    dense.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:
        dense.language_model.lm_head.weight = dense.language_model.model.embed_tokens.weight
    dense._inv_freq = model._inv_freq.clone()
    assert not any(isinstance(m, MoE) for m in dense.modules())
    return dense
