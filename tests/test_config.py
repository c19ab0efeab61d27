"""Config: Hugging Face config.json round-trips exactly; derived layout matches transformers."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from herd.config import ModelConfig, TextConfig, VisionConfig
from herd.presets import PRESETS, get_config
from tests.conftest import model_config

SCOUT_JSON = Path(__file__).parent / "data" / "scout_config.json"


def test_published_scout_config_round_trips_exactly():
    published = json.loads(SCOUT_JSON.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every published field is known: no warning
        cfg = ModelConfig.from_hf_dict(published)
    assert cfg.is_multimodal and cfg.text.temperature_tuning and cfg.text.attn_temperature_tuning == 4
    assert cfg.text.rope_scaling["factor"] == 8.0 and cfg.text.moe_layer_ids == list(range(48))
    assert [i for i in range(48) if not cfg.text.uses_rope(i)] == list(range(3, 48, 4))
    assert cfg.vision.tokens_per_tile == 144
    assert cfg.to_hf_dict() == published


@pytest.mark.parametrize("name", [n for n in PRESETS])
def test_presets_round_trip_and_transformers_agrees_on_layout(name):
    import transformers

    cfg = get_config(name)
    d = cfg.to_hf_dict()
    again = ModelConfig.from_hf_dict(json.loads(json.dumps(d)))
    assert again.to_hf_dict() == d
    hf = transformers.Llama4Config(**{k: v for k, v in d.items() if k != "architectures"})
    t = hf.text_config
    assert t.moe_layers == cfg.text.moe_layer_ids
    assert t.no_rope_layers == cfg.text.rope_layer_flags
    assert t.layer_types == ["chunked_attention" if cfg.text.is_chunked(i) else "full_attention"
                             for i in range(cfg.text.num_hidden_layers)]
    for field in ("vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_local_experts",
                  "num_experts_per_tok", "use_qk_norm", "attention_chunk_size", "floor_scale", "attn_scale",
                  "head_dim", "num_key_value_heads"):
        assert getattr(t, field) == getattr(cfg.text, field), field
    rp = t.rope_parameters
    assert rp["rope_theta"] == cfg.text.rope_theta
    assert rp["rope_type"] == (cfg.text.rope_scaling or {"rope_type": "default"})["rope_type"]
    assert hf.image_token_index == cfg.image_token_index
    for field in ("image_size", "patch_size", "pixel_shuffle_ratio", "projector_input_dim", "vision_output_dim"):
        assert getattr(hf.vision_config, field) == getattr(cfg.vision, field), field


def test_transformers5_rope_parameters_form_round_trips():
    d = {"model_type": "llama4_text", "vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 8,
         "intermediate_size_mlp": 16,
         "rope_parameters": {"rope_theta": 1000.0, "rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}
    cfg = ModelConfig.from_hf_dict(d)
    assert not cfg.is_multimodal and cfg.text.rope_theta == 1000.0 and cfg.text.rope_scaling["factor"] == 2.0
    out = cfg.to_hf_dict()
    assert out["rope_parameters"] == d["rope_parameters"] and "rope_scaling" not in out
    assert {k: out[k] for k in d} == d


def test_causal_lm_layout_and_unknown_fields_warn_but_survive():
    d = model_config(vision=False).to_hf_dict()
    d["some_future_field"] = {"x": 1}
    with pytest.warns(UserWarning, match="some_future_field"):
        cfg = ModelConfig.from_hf_dict(d)
    assert cfg.architecture == "Llama4ForCausalLM"
    assert cfg.to_hf_dict()["some_future_field"] == {"x": 1}


@pytest.mark.parametrize("bad,match", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "multiple of"),
    (dict(head_dim=15), "even"),
    (dict(moe_layers=[0, 9]), "out of range"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "not supported"),
    (dict(hidden_size=0), "positive"),
])
def test_invalid_text_config_is_a_clear_value_error(bad, match):
    base = model_config(vision=False).text.to_hf_dict()
    base.update(bad)
    with pytest.raises(ValueError, match=match):
        TextConfig.from_hf_dict(base)


def test_invalid_vision_and_model_configs():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionConfig(image_size=30, patch_size=7, hidden_size=32, intermediate_size=128, num_attention_heads=2)
    with pytest.raises(ValueError, match="intermediate_size"):
        VisionConfig(image_size=28, patch_size=7, hidden_size=32, intermediate_size=100, num_attention_heads=2)
    cfg = model_config()
    d = cfg.to_hf_dict()
    d["image_token_index"] = 10**6
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ModelConfig.from_hf_dict(d)
    with pytest.raises(ValueError, match="not a Llama 4 config"):
        ModelConfig.from_hf_dict({"model_type": "llama", "vocab_size": 10})


def test_config_json_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="scout"):
        get_config("llama5")


def test_dtype_does_not_round_rope_frequencies():
    import herd

    m = herd.build_model(model_config(vision=True), dtype=torch.bfloat16)
    assert m._inv_freq.dtype == torch.float32 and m.vision_model._rope[0].dtype == torch.float32
