"""herd's Llama 4 against transformers' Llama 4 on identical random weights (the oracle).

Each case builds a random herd model, saves it in the Hugging Face layout, loads that directory
with transformers, and compares fp32 logits: max |herd − transformers| ≤ 1e-4 (absolute; logits
here are O(1)). Between them the cases cover: sequences longer than the chunk, NoPE layers,
temperature tuning (floor_scale 4), QK-norm on/off, MoE every layer / every other layer, top-1 and
top-2 routing, llama3 RoPE scaling and plain RoPE, tied and untied embeddings, explicit moe_layers
and no_rope_layers, text-only CausalLM, and ConditionalGeneration with one image, two images and
a multi-tile image.
"""

from __future__ import annotations

import pytest
import torch

import herd
from tests.conftest import load_transformers, model_config, transformers_logits

TOL = 1e-4

CASES = {
    # name: (model_config kwargs, seq_len, image tiles per image (None = text only))
    "text_chunked_nope_temp_qknorm_llama3": (dict(vision=False), 70, None),
    "text_interleave2_top2_tied_noqk_plainrope": (
        dict(vision=False, text=dict(interleave_moe_layer_step=2, num_experts_per_tok=2, tie_word_embeddings=True,
                                     use_qk_norm=False, rope_scaling=None)), 50, None),
    "text_explicit_layers_no_chunk": (
        dict(vision=False, text=dict(num_hidden_layers=5, moe_layers=[0, 3], no_rope_layers=[1, 0, 1, 1, 0],
                                     attention_chunk_size=None, num_experts_per_tok=2)), 40, None),
    "image_one": (dict(vision=True), 48, [1]),
    "images_two_interleave2": (dict(vision=True, text=dict(interleave_moe_layer_step=2)), 60, [1, 1]),
    "image_multitile_top2_tied": (
        dict(vision=True, text=dict(num_experts_per_tok=2, tie_word_embeddings=True)), 80, [5]),
}


def _prompt(cfg, T, tiles, gen):
    """Random text ids with each image's tokens (tokens_per_tile × tiles) placed inside."""
    ids = torch.randint(0, cfg.text.vocab_size - 128, (1, T), generator=gen)
    pixel_values = None
    if tiles:
        per = cfg.vision.tokens_per_tile
        pos = 3
        for n in tiles:
            ids[0, pos:pos + n * per] = cfg.image_token_index
            pos += n * per + 5
        assert pos < T
        pixel_values = torch.randn(sum(tiles), 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen)
    return ids, pixel_values


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name, tmp_path):
    kwargs, T, tiles = CASES[name]
    cfg = model_config(**kwargs)
    model = herd.build_model(cfg, seed=1).eval()
    herd.save_model(model, tmp_path)
    hf = load_transformers(tmp_path, cfg.is_multimodal)
    gen = torch.Generator().manual_seed(2)
    ids, px = _prompt(cfg, T, tiles, gen)
    with torch.no_grad():
        ours = model(ids, pixel_values=px)
        theirs = transformers_logits(hf, ids, px, cfg.image_token_index)
    assert ours.shape == theirs.shape == (1, T, cfg.text.vocab_size)
    err = (ours - theirs).abs().max().item()
    assert err <= TOL, f"{name}: max |Δlogits| = {err:.2e}"
    # the check has teeth: the same model without its images disagrees
    if px is not None:
        with torch.no_grad():
            blind = model(ids.masked_fill(ids == cfg.image_token_index, 0))
        assert (blind - theirs).abs().max().item() > 100 * TOL


def test_transformers_weights_load_into_herd(tmp_path):
    """The other direction: a random transformers model saved by transformers loads into herd."""
    import transformers

    cfg = model_config(vision=True, text=dict(interleave_moe_layer_step=2))
    hf_cfg = transformers.Llama4Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    torch.manual_seed(3)
    hf = transformers.Llama4ForConditionalGeneration(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    model = herd.load_model(tmp_path)
    gen = torch.Generator().manual_seed(4)
    ids, px = _prompt(cfg, 40, [2], gen)
    with torch.no_grad():
        err = (model(ids, pixel_values=px) - transformers_logits(hf, ids, px, cfg.image_token_index)).abs().max()
    assert err.item() <= TOL


def test_gradients_match_transformers(tmp_path):
    cfg = model_config(vision=True, text=dict(num_experts_per_tok=2))
    model = herd.build_model(cfg, seed=5).train()
    herd.save_model(model, tmp_path)
    hf = load_transformers(tmp_path, True).train()
    gen = torch.Generator().manual_seed(6)
    ids, px = _prompt(cfg, 56, [2], gen)
    target = torch.randint(0, cfg.text.vocab_size, (1, 56), generator=gen)

    loss_ours = torch.nn.functional.cross_entropy(model(ids, pixel_values=px)[0], target[0])
    loss_theirs = torch.nn.functional.cross_entropy(
        transformers_logits(hf, ids, px, cfg.image_token_index)[0], target[0])
    loss_ours.backward()
    loss_theirs.backward()
    assert abs(loss_ours.item() - loss_theirs.item()) < 1e-5
    theirs = dict(hf.named_parameters())
    names = ["language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
             "language_model.model.layers.0.self_attn.q_proj.weight",
             "language_model.model.layers.3.self_attn.k_proj.weight",  # NoPE layer
             "language_model.model.layers.1.feed_forward.router.weight",
             "language_model.model.layers.1.feed_forward.experts.gate_up_proj",
             "language_model.model.layers.2.feed_forward.experts.down_proj",
             "language_model.model.layers.2.feed_forward.shared_expert.up_proj.weight",
             "vision_model.model.layers.0.self_attn.q_proj.weight", "vision_model.class_embedding",
             "vision_model.vision_adapter.mlp.fc1.weight", "multi_modal_projector.linear_1.weight"]
    for name in names:
        g_ours = dict(model.named_parameters())[name].grad
        g_theirs = theirs[name].grad
        assert g_ours is not None and g_theirs is not None, name
        scale = g_theirs.abs().max().item()
        assert scale > 0, name
        err = (g_ours - g_theirs).abs().max().item()
        assert err <= 1e-4 * max(1.0, scale), f"{name}: max |Δgrad| = {err:.2e} (scale {scale:.2e})"
