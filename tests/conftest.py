"""Shared test fixtures: small random configs, a random model directory with its own trained
tokenizer (`random_model_dir`), and the transformers oracle."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from herd.config import ModelConfig, TextConfig, VisionConfig

torch.set_num_threads(min(2, os.cpu_count() or 1))


def text_config(**over) -> TextConfig:
    """A small text config with every Llama 4 feature switched on (chunk 16, NoPE every 4th,
    temperature tuning from position 3, QK-norm, 4 experts top-1, llama3 RoPE scaling)."""
    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=48, intermediate_size_mlp=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
              interleave_moe_layer_step=1, use_qk_norm=True, attention_chunk_size=16, attn_temperature_tuning=True,
              floor_scale=4, attn_scale=0.5, rope_theta=10000.0, bos_token_id=500, eos_token_id=[501, 508],
              pad_token_id=None, tie_word_embeddings=False, max_position_embeddings=4096,
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 64})
    kw.update(over)
    return TextConfig(**kw)


def vision_config(**over) -> VisionConfig:
    """28-px tiles, 7-px patches → 16 patches → pixel shuffle 0.5 → 4 tokens per tile."""
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
              vision_output_dim=48, image_size=28, patch_size=7, pixel_shuffle_ratio=0.5, projector_input_dim=48,
              projector_output_dim=48, rope_theta=10000.0)
    kw.update(over)
    return VisionConfig(**kw)


def model_config(vision: bool = True, text: dict | None = None, **vis) -> ModelConfig:
    tc = text_config(**(text or {}))
    if not vision:
        return ModelConfig(text=tc, vision=None, tie_word_embeddings=tc.tie_word_embeddings)
    return ModelConfig(text=tc, vision=vision_config(**vis), image_token_index=tc.vocab_size - 36,
                       boi_token_index=tc.vocab_size - 48, eoi_token_index=tc.vocab_size - 47)


def random_model_dir(d, texts, vocab_size: int = 512, vision: bool = False, seed: int = 0, text: dict | None = None,
                     chat_ids: bool = False) -> Path:
    """Directory d with a random model_config(vision, text) model (seed) and a byte-level BPE of
    vocab_size trained on `texts` (tokenizer.json): what herd.load_model, the engine, the CLI, lm-eval
    and the post-training stages read. The tokenizer puts the Llama 4 specials at the top of the id
    range, where model_config puts the image tokens (checked); chat_ids also sets the model's BOS to
    <|begin_of_text|> and its EOS to <|end_of_text|>, <|eom|>, <|eot|> (model_config's defaults
    are ids 500 / 501, 508)."""
    import herd
    from herd.tokenizer_train import train_tokenizer

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(texts, vocab_size, d)
    text = {"vocab_size": vocab_size, **(text or {})}
    if chat_ids:
        sp = tok.special_tokens
        text.update(bos_token_id=sp["<|begin_of_text|>"],
                    eos_token_id=[sp["<|end_of_text|>"], sp["<|eom|>"], sp["<|eot|>"]])
    cfg = model_config(vision=vision, text=text)
    if vision:
        sp = tok.special_tokens
        assert (sp["<|patch|>"], sp["<|image_start|>"], sp["<|image_end|>"]) == \
            (cfg.image_token_index, cfg.boi_token_index, cfg.eoi_token_index)
    herd.save_model(herd.build_model(cfg, seed=seed), d)
    return d


def load_transformers(model_dir, multimodal: bool):
    """The oracle: transformers' Llama 4 loaded from a directory herd wrote (eager attention, fp32)."""
    import transformers
    cls = transformers.Llama4ForConditionalGeneration if multimodal else transformers.Llama4ForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        return cls.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager").eval()


def transformers_logits(hf, input_ids, pixel_values=None, image_token_index=None):
    """Logits from transformers. Its ConditionalGeneration.forward (5.24) crashes on a missing
    `image_outputs` attribute, so images are fused here with its own vision tower and projector."""
    if pixel_values is None:
        lm = getattr(hf, "language_model", hf)
        return lm(input_ids=input_ids).logits
    feats = hf.vision_model(pixel_values).last_hidden_state
    proj = hf.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))
    emb = hf.language_model.model.embed_tokens(input_ids)
    emb = emb.masked_scatter((input_ids == image_token_index)[..., None], proj)
    return hf.language_model(inputs_embeds=emb).logits


def _torch_threads(n: int):
    """torch on n threads for the test, then back to what it was (the body of the thread fixtures)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """torch on one thread for the test, then back (suites that start servers, engines or lm-eval)."""
    yield from _torch_threads(1)


@pytest.fixture
def two_threads():
    """torch on two threads for the test, then back (code paths that only run with more than one thread)."""
    yield from _torch_threads(2)
