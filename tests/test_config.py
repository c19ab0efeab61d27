"""Config: Hugging Face config.json round-trips exactly; derived layout matches transformers."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

from herd.config import ModelConfig, TextConfig, VisionConfig
from herd.presets import PRESETS, get_config
from tests.conftest import model_config

DATA = Path(__file__).parent / "data"
SCOUT_RELEASE_JSON = DATA / "scout_release_config.json"  # tests/data/README.md: what each file is
GOLDEN = {"scout": DATA / "scout_config.json", "maverick": DATA / "maverick_config.json",
          "guard4": DATA / "guard4_config.json"}


def _read(path: Path) -> ModelConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every published field is known: no warning
        return ModelConfig.from_hf_dict(json.loads(path.read_text()))


def test_published_scout_config_round_trips_exactly():
    published = json.loads(SCOUT_RELEASE_JSON.read_text())
    cfg = _read(SCOUT_RELEASE_JSON)
    assert cfg.is_multimodal and cfg.text.temperature_tuning and cfg.text.attn_temperature_tuning is True
    assert cfg.text.rope_scaling["factor"] == 8.0 and cfg.text.moe_layer_ids == list(range(48))
    assert [i for i in range(48) if not cfg.text.uses_rope(i)] == list(range(3, 48, 4))
    assert cfg.vision.tokens_per_tile == 144
    out = cfg.to_hf_dict()
    # the one value herd normalises: Meta's int 4 is written as the bool transformers 5 accepts
    assert published["text_config"]["attn_temperature_tuning"] == 4
    assert out["text_config"]["attn_temperature_tuning"] is True
    published["text_config"]["attn_temperature_tuning"] = True
    assert out == published


def _fields(obj) -> dict:
    """A config's meaning, field by field: dataclass fields (minus round-trip bookkeeping), with
    the two layout lists resolved (None means "derive from the interval")."""
    out = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
           if f.name not in ("extra", "rope_style", "source_keys", "name", "text", "vision")}
    if isinstance(obj, TextConfig):
        out["moe_layers"], out["no_rope_layers"] = obj.moe_layer_ids, obj.rope_layer_flags
        out["chunked_layers"] = [i for i in range(obj.num_hidden_layers) if obj.is_chunked(i)]
    return out


@pytest.mark.parametrize("name", list(GOLDEN))
def test_preset_equals_its_golden_config(name):
    """Each published preset equals, field by field, what herd parses from the golden copy of the
    model's config.json (tests/data/README.md gives every file's provenance)."""
    preset, golden = get_config(name), _read(GOLDEN[name])
    assert golden.architecture == preset.architecture == "Llama4ForConditionalGeneration"
    for part in ("text", "vision", None):
        p = _fields(getattr(preset, part) if part else preset)
        g = _fields(getattr(golden, part) if part else golden)
        assert p.keys() == g.keys()
        wrong = {k: (p[k], g[k]) for k in p if p[k] != g[k]}
        assert not wrong, f"{name} {part or 'top-level'} fields differ (preset, golden): {wrong}"


def test_scout_preset_uses_the_current_rope_scaling_not_the_release_day_one():
    """Scout's RoPE scaling changed after release (llama-models PR #322): factor 16, low/high 1.
    The two settings rotate 35 of the 64 frequency pairs differently, and the release-day file
    still loads with its own values."""
    from herd.model.rope import text_inv_freq

    cur, rel = get_config("scout").text, _read(SCOUT_RELEASE_JSON).text
    assert cur.rope_scaling == {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}
    assert rel.rope_scaling["factor"] == 8.0 and rel.rope_scaling["high_freq_factor"] == 4.0
    # everything but the scaling is the same model
    differ = {k for k, v in _fields(cur).items() if _fields(rel)[k] != v}
    assert differ == {"rope_scaling"}
    a, b = text_inv_freq(128, 500000.0, cur.rope_scaling), text_inv_freq(128, 500000.0, rel.rope_scaling)
    assert int((a != b).sum()) == 35
    assert 80 < float((100_000 * (a - b).double()).abs().max()) < 100  # ~89 rad at position 100,000


def test_guard4_preset_is_dense_with_full_attention():
    g = get_config("guard4").text
    assert g.attention_chunk_size is None and not any(g.is_chunked(i) for i in range(48))
    assert g.moe_layer_ids == [] and g.num_local_experts == 0 and g.intermediate_size_mlp == 8192


def test_attn_temperature_tuning_reads_int_or_bool_and_writes_bool():
    for raw, on in ((4, True), (1, True), (0, False), (True, True), (False, False)):
        d = model_config(vision=False).to_hf_dict()
        d["attn_temperature_tuning"] = raw
        cfg = ModelConfig.from_hf_dict(d)
        assert cfg.text.temperature_tuning is on and cfg.text.attn_temperature_tuning is on
        assert cfg.to_hf_dict()["attn_temperature_tuning"] is on


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
