"""Named model presets: the published Llama 4 family and the CPU-sized models herd trains.

Published shapes (Scout, Maverick, Llama Guard 4) follow the Hugging Face configs Meta released;
`herd params scout` reproduces their parameter counts exactly. Each one equals, field by field,
the golden copy of its config.json in tests/data/ (tests/data/README.md says where every value
comes from). Two values changed after release and follow the current files:
  * Scout's RoPE scaling is llama3 with factor 16, low_freq_factor 1, high_freq_factor 1 over the
    original 8192 positions (llama-models PR #322; the release-day config.json had factor 8 and
    high_freq_factor 4: 35 of 64 frequencies differ, and long contexts see it).
  * Llama Guard 4 is dense with full (unchunked) attention: attention_chunk_size null, no routed
    experts, every layer RoPE.
A directory's own config.json always wins over a preset: `herd.load_model(dir)` reads its values.
Behemoth has no published config: see `_behemoth` for how its shape was chosen.

The CPU presets (`tiny`, `small`) keep every architectural feature of Scout (MoE with a shared
expert, iRoPE with NoPE every 4th layer, chunked attention, QK-norm, temperature tuning, the
vision tower with pixel shuffle) at sizes that train in minutes on 2 cores. Their vocabulary is
a trained byte-level BPE whose top 128 ids hold the Llama 4 special tokens in Meta's order, so
`<|patch|>` is id vocab_size - 128 + 92.
"""

from __future__ import annotations

import copy

from herd.config import ModelConfig, TextConfig, VisionConfig

# Offsets of Llama 4 special tokens from the first special id (200000 in the official tokenizer).
SPECIAL_OFFSETS = {"begin_of_text": 0, "end_of_text": 1, "header_start": 5, "header_end": 6, "eom": 7,
                   "eot": 8, "image_start": 80, "image_end": 81, "image": 90, "patch": 92}
NUM_SMALL_SPECIALS = 128  # special slots at the top of a herd-trained vocabulary

# llama3 RoPE scaling as published (see the module docstring and tests/data/README.md).
SCOUT_ROPE_SCALING = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192}
SCOUT_RELEASE_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}  # release day; Llama Guard 4 keeps it


def _published_vision() -> VisionConfig:
    return VisionConfig(hidden_size=1408, num_hidden_layers=34, num_attention_heads=16, intermediate_size=5632,
                        vision_output_dim=4096, image_size=336, patch_size=14, pixel_shuffle_ratio=0.5,
                        projector_input_dim=4096, projector_output_dim=4096, rope_theta=10000.0)


def _scout_text(**over) -> TextConfig:
    kw = dict(vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
              num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
              max_position_embeddings=10485760, rms_norm_eps=1e-5, pad_token_id=200018, bos_token_id=200000,
              eos_token_id=[200001, 200007, 200008], num_local_experts=16, num_experts_per_tok=1,
              interleave_moe_layer_step=1, use_qk_norm=True, attention_chunk_size=8192,
              attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1, rope_theta=500000.0,
              # Scout's current config.json and Meta's reference code (llama-models PR #322).
              rope_scaling=dict(SCOUT_ROPE_SCALING))
    kw.update(over)
    return TextConfig(**kw)


def _scout() -> ModelConfig:
    return ModelConfig(text=_scout_text(), vision=_published_vision(), name="scout")


def _maverick() -> ModelConfig:
    # 128 experts on every other layer (dense SwiGLU of width 16384 between them), no QK-norm,
    # unscaled RoPE, 1M-token context.
    text = _scout_text(num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
                       max_position_embeddings=1048576, rope_scaling=None)
    return ModelConfig(text=text, vision=_published_vision(), name="maverick")


def _behemoth() -> ModelConfig:
    # Meta published only: 16 experts, ~2T total, 288B active. No config exists. We keep Scout's
    # recipe (every layer MoE, top-1 + shared expert, NoPE every 4th layer, chunked attention,
    # head_dim 128, GQA 8:1, the same vocabulary) and solve for width, depth and expert width:
    #   total − active = layers · 15 experts · 3·hidden·inner ≈ 2T − 288B fixes layers·hidden·inner;
    #   the remaining active budget fixes attention (∝ layers·hidden²).
    #   hidden 16384, 128 heads / 16 KV heads, 96 layers, expert width 23552
    #   → 1.95T total, 286.9B active (`herd params behemoth`).
    text = _scout_text(hidden_size=16384, num_attention_heads=128, num_key_value_heads=16, num_hidden_layers=96,
                       intermediate_size=23552, intermediate_size_mlp=47104)
    return ModelConfig(text=text, vision=_published_vision(), name="behemoth")


def _guard4() -> ModelConfig:
    # Llama Guard 4 12B: Scout with the routed experts pruned away; the shared expert stays as
    # every layer's dense MLP (width 8192). Full causal attention (attention_chunk_size null, as
    # in the published config) with RoPE on every layer, 8192 positions, the release-day llama3
    # scaling. Multimodal, same vision tower. tests/data/README.md lists which of these values
    # were confirmed from public sources and which follow transformers' converter.
    text = _scout_text(moe_layers=[], interleave_moe_layer_step=0, num_local_experts=0, intermediate_size_mlp=8192,
                       attention_chunk_size=None, no_rope_layers=[1] * 48, max_position_embeddings=8192,
                       rope_scaling=dict(SCOUT_RELEASE_ROPE_SCALING), extra={"cache_implementation": "static"})
    return ModelConfig(text=text, vision=_published_vision(), name="guard4")


def _cpu_preset(name: str, *, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, experts: int,
                inter: int, chunk: int, vision_hidden: int, vision_layers: int, tile: int, patch: int) -> ModelConfig:
    base = vocab - NUM_SMALL_SPECIALS
    head_dim = hidden // heads
    text = TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, intermediate_size_mlp=2 * inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=1 << 20, bos_token_id=base, eos_token_id=[base + 1, base + 7, base + 8],
        pad_token_id=None, num_local_experts=experts, num_experts_per_tok=1, interleave_moe_layer_step=1,
        use_qk_norm=True, attention_chunk_size=chunk, attn_temperature_tuning=True, floor_scale=chunk,
        attn_scale=0.1, rope_theta=500000.0, rope_scaling=None, tie_word_embeddings=False)
    vision = VisionConfig(hidden_size=vision_hidden, num_hidden_layers=vision_layers, num_attention_heads=4,
                          intermediate_size=4 * vision_hidden, vision_output_dim=hidden, image_size=tile,
                          patch_size=patch, pixel_shuffle_ratio=0.5, projector_input_dim=hidden,
                          projector_output_dim=hidden, rope_theta=10000.0)
    return ModelConfig(text=text, vision=vision, boi_token_index=base + SPECIAL_OFFSETS["image_start"],
                       eoi_token_index=base + SPECIAL_OFFSETS["image_end"],
                       image_token_index=base + SPECIAL_OFFSETS["patch"], name=name)


def _tiny(hidden: int = 256, layers: int = 4) -> ModelConfig:
    # ~13M parameters: trains in minutes on 2 CPU cores. 28-px tiles of 7-px patches → 16 patches
    # → pixel shuffle 0.5 → 4 <|patch|> tokens per tile. Width and depth can be varied (MetaP
    # transfer experiments): heads grow with width at a fixed head_dim of 32, experts as wide as
    # the model.
    return _cpu_preset("tiny", vocab=8192, hidden=hidden, layers=layers, heads=hidden // 32,
                       kv_heads=max(1, hidden // 128), experts=16, inter=hidden, chunk=256, vision_hidden=128,
                       vision_layers=2, tile=28, patch=7)


def scaled_tiny(hidden: int, layers: int = 4) -> ModelConfig:
    """The tiny recipe at another width / depth (same vocabulary, vision tower and data)."""
    if hidden % 128:
        raise ValueError(f"hidden must be a multiple of 128, got {hidden}")
    cfg = _tiny(hidden, layers)
    cfg.name = f"tiny-w{hidden}-l{layers}"
    return cfg


def _small() -> ModelConfig:
    return _cpu_preset("small", vocab=16384, hidden=512, layers=8, heads=8, kv_heads=2, experts=16, inter=512,
                       chunk=1024, vision_hidden=256, vision_layers=4, tile=56, patch=7)


PRESETS = {"scout": _scout, "maverick": _maverick, "behemoth": _behemoth, "guard4": _guard4,
           "tiny": _tiny, "small": _small}


def get_config(name: str) -> ModelConfig:
    """A fresh copy of a preset's config. Raises ValueError naming the presets on a bad name."""
    try:
        return copy.deepcopy(PRESETS[name]())
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
