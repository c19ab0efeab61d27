"""Model configuration: the one source of truth for Llama 4 text, MoE and vision settings.

Field names and defaults follow Hugging Face's `Llama4TextConfig` / `Llama4VisionConfig` /
`Llama4Config`, so a published `config.json` reads in and writes back out unchanged:

    cfg = ModelConfig.from_hf_dict(json.load(open("config.json")))
    json.dump(cfg.to_hf_dict(), ...)        # same fields, same values

One value is normalised on the way through: Meta's release configs give `attn_temperature_tuning`
as the int 4, which transformers 5.24 refuses; herd reads any int (non-zero = on) and writes the
bool, so everything herd writes loads in transformers.

Both layouts are understood: `Llama4ForConditionalGeneration` (nested `text_config` /
`vision_config`) and `Llama4ForCausalLM` (flat text fields). RoPE settings are read in the
transformers-4 form (`rope_theta` + `rope_scaling`, as Meta published them) and in the
transformers-5 form (`rope_parameters`) and written back in the form they were read in.
Unknown fields produce a warning and are kept, so they round-trip too.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# Fields every Hugging Face config may carry (PretrainedConfig's generic attributes). They are
# kept for round-trip but carry no meaning for herd, so they are not warned about.
_GENERIC_HF_FIELDS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "_attn_implementation_autoset", "_attn_implementation", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "finetuning_task", "id2label", "label2id",
    "tokenizer_class", "prefix", "problem_type", "task_specific_params", "decoder_start_token_id",
    "sep_token_id", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "temperature", "top_k", "top_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "num_beam_groups", "diversity_penalty",
    "typical_p", "encoder_no_repeat_ngram_size", "for_llm_compressor", "quantization_config",
    "cache_implementation",  # generation setting (Llama Guard 4's config has "static")
}


def _warn_unknown(kind: str, names) -> None:
    names = sorted(n for n in names if n not in _GENERIC_HF_FIELDS)
    if names:
        warnings.warn(f"{kind}: ignoring unknown config field(s) {names} (kept for round-trip)", stacklevel=3)


@dataclass
class TextConfig:
    """The language model: decoder stack, iRoPE attention, MoE. Names as in `Llama4TextConfig`."""

    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192  # per routed expert and the shared expert
    intermediate_size_mlp: int = 16384  # dense (non-MoE) layers
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096 * 32
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    attention_bias: bool = False
    # Mixture of experts
    num_experts_per_tok: int = 1
    num_local_experts: int = 16
    moe_layers: list[int] | None = None
    interleave_moe_layer_step: int = 1
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    # Positions: RoPE (llama3 scaling), iRoPE interleaving, chunked-local attention
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    no_rope_layers: list[int] | None = None  # 1 = RoPE layer (chunked), 0 = NoPE layer (global)
    no_rope_layer_interval: int = 4
    attention_chunk_size: int | None = 8192
    layer_types: list[str] | None = None
    use_qk_norm: bool = True
    # Inference-time temperature tuning on NoPE layers. Meta's release configs ship the int 4, which
    # transformers 5.24 refuses: any int is read (non-zero = on) and held, and written, as a bool.
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    extra: dict = field(default_factory=dict, repr=False)
    rope_style: str = field(default="legacy", repr=False)  # "legacy" (rope_theta+rope_scaling) or "v5"
    source_keys: frozenset | None = field(default=None, repr=False, compare=False)  # fields read from a file

    def __post_init__(self):
        if isinstance(self.attn_temperature_tuning, int):  # bool is an int too; 4 → True
            self.attn_temperature_tuning = bool(self.attn_temperature_tuning)
        self.validate()

    # ----- derived layout -------------------------------------------------------------------
    @property
    def moe_layer_ids(self) -> list[int]:
        if self.moe_layers is not None:
            return list(self.moe_layers)
        step = self.interleave_moe_layer_step
        return list(range(step - 1, self.num_hidden_layers, step)) if step > 0 else []

    @property
    def rope_layer_flags(self) -> list[int]:
        """1 where the layer applies RoPE (and is chunked-local), 0 for a global NoPE layer."""
        if self.no_rope_layers:
            return [int(x) for x in self.no_rope_layers[: self.num_hidden_layers]]
        n = self.no_rope_layer_interval
        return [int((i + 1) % n != 0) for i in range(self.num_hidden_layers)]

    def uses_rope(self, layer: int) -> bool:
        return bool(self.rope_layer_flags[layer])

    def is_chunked(self, layer: int) -> bool:
        """Chunked-local attention on this layer (the RoPE layers when attention_chunk_size is set)."""
        if self.layer_types is not None:
            return self.layer_types[layer] == "chunked_attention"
        return self.uses_rope(layer) and self.attention_chunk_size is not None

    def is_moe(self, layer: int) -> bool:
        return layer in set(self.moe_layer_ids)

    @property
    def temperature_tuning(self) -> bool:
        return bool(self.attn_temperature_tuning)

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ValueError(f"invalid text config: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size", "intermediate_size_mlp"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, f"{name} must be a positive int, got {v!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
             f"num_key_value_heads ({self.num_key_value_heads})")
        need(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        need(self.attention_chunk_size is None or self.attention_chunk_size > 0,
             f"attention_chunk_size must be positive or null, got {self.attention_chunk_size}")
        need(self.hidden_act == "silu", f"hidden_act must be 'silu', got {self.hidden_act!r}")
        if self.moe_layer_ids:
            need(self.num_local_experts > 0, "MoE layers need num_local_experts > 0")
            need(1 <= self.num_experts_per_tok <= self.num_local_experts,
                 f"num_experts_per_tok must be in [1, {self.num_local_experts}], got {self.num_experts_per_tok}")
        bad = [i for i in self.moe_layer_ids if not 0 <= i < self.num_hidden_layers]
        need(not bad, f"moe_layers out of range: {bad}")
        if self.no_rope_layers:
            need(len(self.no_rope_layers) >= self.num_hidden_layers,
                 f"no_rope_layers has {len(self.no_rope_layers)} entries for {self.num_hidden_layers} layers")
        if self.layer_types is not None:
            need(len(self.layer_types) >= self.num_hidden_layers, "layer_types shorter than num_hidden_layers")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("rope_type", rs.get("type", "default"))
            need(kind in ("llama3", "default"), f"rope scaling type {kind!r} is not supported (llama3 or default)")

    # ----- HF I/O ----------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict) -> "TextConfig":
        d = dict(d)
        style = "legacy"
        if "rope_parameters" in d:
            style = "v5"
            rp = dict(d.pop("rope_parameters") or {})
            d.setdefault("rope_theta", rp.pop("rope_theta", cls.rope_theta))
            if rp.get("rope_type", "default") != "default":
                d["rope_scaling"] = rp
            else:
                d.setdefault("rope_scaling", None)
        return _from_dict(cls, d, "text_config", rope_style=style)

    def to_hf_dict(self) -> dict:
        out = _to_dict(self)
        if self.source_keys is None or "no_rope_layers" in self.source_keys:
            out["no_rope_layers"] = self.rope_layer_flags
        if self.source_keys is None or "moe_layers" in self.source_keys:
            out["moe_layers"] = self.moe_layer_ids
        if self.rope_style == "v5":
            rp = {"rope_theta": out.pop("rope_theta")}
            rp.update(out.pop("rope_scaling") or {"rope_type": "default"})
            out["rope_parameters"] = rp
        out["model_type"] = "llama4_text"
        return out


@dataclass
class VisionConfig:
    """The vision encoder and its pixel-shuffle adapter. Names as in `Llama4VisionConfig`."""

    hidden_size: int = 768
    hidden_act: str = "gelu"
    num_hidden_layers: int = 34
    num_attention_heads: int = 16
    num_channels: int = 3
    intermediate_size: int = 5632
    vision_output_dim: int = 7680
    image_size: int = 448  # tile side in pixels
    patch_size: int = 14
    norm_eps: float = 1e-5
    vision_feature_select_strategy: str = "default"
    vision_feature_layer: int = -1
    initializer_range: float = 0.02
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    multi_modal_projector_bias: bool = False
    projector_dropout: float = 0.0
    attention_dropout: float = 0.0
    rope_theta: float = 10000.0
    extra: dict = field(default_factory=dict, repr=False)
    rope_style: str = field(default="legacy", repr=False)
    source_keys: frozenset | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.validate()

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """`<|patch|>` tokens one tile becomes after pixel shuffle (144 for Llama 4)."""
        side = int(self.patches_per_side * self.pixel_shuffle_ratio)
        return side * side

    @property
    def shuffled_dim(self) -> int:
        return int(self.hidden_size / self.pixel_shuffle_ratio**2)

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ValueError(f"invalid vision config: {msg}")

        need(self.image_size % self.patch_size == 0,
             f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        need(self.hidden_size % self.num_attention_heads == 0, "hidden_size must divide by num_attention_heads")
        side = self.patches_per_side * self.pixel_shuffle_ratio
        need(abs(side - round(side)) < 1e-9,
             f"patches per side ({self.patches_per_side}) times pixel_shuffle_ratio must be an integer")
        # The adapter's first linear takes the pixel-shuffled width; HF sizes it by intermediate_size.
        need(self.shuffled_dim == self.intermediate_size,
             f"pixel-shuffled width hidden_size/ratio^2 = {self.shuffled_dim} must equal intermediate_size "
             f"({self.intermediate_size}), as the published checkpoints and transformers assume")
        need(self.projector_output_dim == self.vision_output_dim,
             f"projector_output_dim ({self.projector_output_dim}) must equal vision_output_dim "
             f"({self.vision_output_dim})")

    @classmethod
    def from_hf_dict(cls, d: dict) -> "VisionConfig":
        d = dict(d)
        style = "legacy"
        if "rope_parameters" in d:
            style = "v5"
            rp = d.pop("rope_parameters") or {}
            d.setdefault("rope_theta", rp.get("rope_theta", cls.rope_theta))
        for k in ("image_size", "patch_size"):  # HF allows [h, w]; Llama 4 tiles are square
            if isinstance(d.get(k), (list, tuple)):
                a, b = d[k]
                if a != b:
                    raise ValueError(f"vision {k} must be square, got {d[k]}")
                d[k] = a
        return _from_dict(cls, d, "vision_config", rope_style=style)

    def to_hf_dict(self) -> dict:
        out = _to_dict(self)
        if self.rope_style == "v5":
            out["rope_parameters"] = {"rope_theta": out.pop("rope_theta"), "rope_type": "default"}
        out["model_type"] = "llama4_vision_model"
        return out


@dataclass
class ModelConfig:
    """A whole model: text decoder, optional vision tower + projector, and the image token ids."""

    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig | None = None
    boi_token_index: int = 200080
    eoi_token_index: int = 200081
    image_token_index: int = 200092
    tie_word_embeddings: bool = False
    extra: dict = field(default_factory=dict, repr=False)
    name: str = field(default="", repr=False)  # preset name or directory it came from

    def __post_init__(self):
        if self.vision is not None and not 0 <= self.image_token_index < self.text.vocab_size:
            raise ValueError(f"image_token_index {self.image_token_index} is outside the vocabulary "
                             f"(vocab_size {self.text.vocab_size})")

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    @property
    def architecture(self) -> str:
        return "Llama4ForConditionalGeneration" if self.is_multimodal else "Llama4ForCausalLM"

    # ----- HF I/O ----------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict, name: str = "") -> "ModelConfig":
        d = copy.deepcopy(d)
        if "text_config" in d:  # Llama4ForConditionalGeneration layout
            text = TextConfig.from_hf_dict(d.pop("text_config") or {})
            vd = d.pop("vision_config", None)
            vision = VisionConfig.from_hf_dict(vd) if vd is not None else None
            known = {f.name for f in dataclasses.fields(cls)} - {"text", "vision", "extra", "name"}
            kw = {k: d.pop(k) for k in list(d) if k in known}
            for alias, real in (("image_token_id", "image_token_index"), ("boi_token_id", "boi_token_index"),
                                ("eoi_token_id", "eoi_token_index")):
                if alias in d:
                    kw.setdefault(real, d.pop(alias))
            _warn_unknown("llama4 config", d)
            return cls(text=text, vision=vision, extra=d, name=name, **kw)
        mt = d.get("model_type", "llama4_text")
        if mt not in ("llama4_text", "llama4"):
            raise ValueError(f"not a Llama 4 config: model_type is {mt!r} (expected 'llama4' or 'llama4_text')")
        text = TextConfig.from_hf_dict(d)
        return cls(text=text, vision=None, tie_word_embeddings=text.tie_word_embeddings, name=name)

    def to_hf_dict(self) -> dict:
        if not self.is_multimodal:
            out = self.text.to_hf_dict()
            out.setdefault("architectures", ["Llama4ForCausalLM"])
            return out
        out = dict(self.extra)
        out.update(
            architectures=out.get("architectures", ["Llama4ForConditionalGeneration"]),
            model_type="llama4",
            boi_token_index=self.boi_token_index,
            eoi_token_index=self.eoi_token_index,
            image_token_index=self.image_token_index,
            tie_word_embeddings=self.tie_word_embeddings,
            text_config=self.text.to_hf_dict(),
            vision_config=self.vision.to_hf_dict(),
        )
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d, name=str(path.parent))

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")

    def text_only(self) -> "ModelConfig":
        return ModelConfig(text=copy.deepcopy(self.text), vision=None,
                           tie_word_embeddings=self.text.tie_word_embeddings, name=self.name)


_INTERNAL_FIELDS = ("extra", "rope_style", "source_keys")


def _from_dict(cls, d: dict, kind: str, **kw):
    names = {f.name for f in dataclasses.fields(cls)} - set(_INTERNAL_FIELDS)
    args = {k: v for k, v in d.items() if k in names}
    extra = {k: v for k, v in d.items() if k not in names and k != "model_type"}
    _warn_unknown(kind, extra)
    return cls(**args, extra=extra, source_keys=frozenset(d), **kw)


def _to_dict(obj) -> dict:
    """Fields as HF writes them. A config read from a file writes back the fields it had plus any
    that differ from the defaults; one made in code writes every field."""
    out = dict(obj.extra)
    keys = obj.source_keys
    for f in dataclasses.fields(obj):
        if f.name in _INTERNAL_FIELDS:
            continue
        value = getattr(obj, f.name)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if keys is None or f.name in keys or value != default:
            out[f.name] = copy.deepcopy(value)
    return out


def load_config(path: str | Path) -> ModelConfig:
    """Read config.json from a model directory (or the file itself)."""
    return ModelConfig.from_json(path)

