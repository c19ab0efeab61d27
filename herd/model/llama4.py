"""The assembled Llama 4 model: decoder stack, early fusion of image features, LM head.

`Llama4` holds three parts whose parameter names are exactly those of Hugging Face's
`Llama4ForConditionalGeneration` (`language_model.*`, `vision_model.*`, `multi_modal_projector.*`);
a text-only model has no vision parts and saves in the `Llama4ForCausalLM` layout.

Early fusion: image tiles are encoded to one feature vector per `<|patch|>` token, and those
vectors replace the token embeddings at the `image_token_index` positions, in order, before the
first decoder layer — the decoder sees text and image tokens in one sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import ModelConfig, TextConfig
from herd.model.attention import Attention
from herd.model.loss import linear_cross_entropy
from herd.model.moe import MoE, SwiGLU
from herd.model.rope import rope_angles, text_inv_freq
from herd.model.vision import MultiModalProjector, VisionModel


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe(layer)
        self.feed_forward = MoE(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size_mlp)

    def forward(self, x, positions, rope, cache=None, doc_ids=None):
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, cache, doc_ids)
        return x + self.feed_forward(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """Embeddings, decoder layers, final norm (HF `Llama4TextModel`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Text model + LM head (HF `Llama4ForCausalLM`: keys `model.*`, `lm_head.weight`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.model = TextModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


class Llama4(nn.Module):
    """A Llama 4 model, text-only or multimodal, as `config` describes it.

    forward(input_ids [B, T], pixel_values [n_tiles, 3, S, S] | None) → logits [B, T, vocab]
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        tc = config.text
        self.language_model = CausalLM(tc)
        if config.vision is not None:
            self.vision_model = VisionModel(config.vision)
            self.multi_modal_projector = MultiModalProjector(config.vision.vision_output_dim, tc.hidden_size)
        else:
            self.vision_model = self.multi_modal_projector = None
        # Kept in float32 outside the module's buffers, so model.to(bfloat16) cannot round it.
        self._inv_freq = text_inv_freq(tc.head_dim, tc.rope_theta, tc.rope_scaling)

    # ----- convenience ----------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.model.layers

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    def moe_layers(self) -> list[MoE]:
        return [layer.feed_forward for layer in self.layers if layer.is_moe]

    # ----- init -----------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float | None = None, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for matrices and embeddings, ones/zeros for norms and biases,
        as transformers initialises Llama 4 (MetaP in herd.train replaces this for training)."""
        std = self.config.text.initializer_range if std is None else std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif module.__class__.__name__ == "Experts":
                module.gate_up_proj.normal_(0.0, std, generator=generator)
                module.down_proj.normal_(0.0, std, generator=generator)
        if self.vision_model is not None:
            scale = self.config.vision.hidden_size ** -0.5
            self.vision_model.class_embedding.normal_(0.0, scale, generator=generator)
            self.vision_model.positional_embedding_vlm.normal_(0.0, scale, generator=generator)

    # ----- inputs ---------------------------------------------------------------------------
    def check_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> None:
        """Clear errors for malformed inputs (instead of index errors deep inside)."""
        tc = self.config.text
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D LongTensor [batch, seq], got "
                             f"{getattr(input_ids, 'shape', type(input_ids))}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
            raise ValueError(f"input_ids must have an integer dtype (torch.long), got {input_ids.dtype}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= tc.vocab_size):
            raise ValueError(f"token ids must lie in [0, {tc.vocab_size}), got min {int(input_ids.min())} "
                             f"max {int(input_ids.max())}")
        if pixel_values is None:
            return
        if self.vision_model is None:
            raise ValueError("this model is text-only (no vision_config) but pixel_values were given")
        vc = self.config.vision
        want = (vc.num_channels, vc.image_size, vc.image_size)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values must be [n_tiles, {want[0]}, {want[1]}, {want[2]}], got "
                             f"{tuple(getattr(pixel_values, 'shape', ()))}")
        if not pixel_values.dtype.is_floating_point:
            raise ValueError(f"pixel_values must be a floating-point tensor (normalised pixels), got "
                             f"{pixel_values.dtype}")

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [n_tiles, 3, S, S] → one text-width vector per `<|patch|>` token [n·t, H]."""
        feats = self.vision_model(pixel_values.to(self.vision_model.class_embedding.dtype))
        return self.multi_modal_projector(feats.flatten(0, 1))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features fused in at `<|patch|>` positions → [B, T, H]."""
        h = self.language_model.model.embed_tokens(input_ids)
        if pixel_values is not None and image_features is None:
            image_features = self.encode_images(pixel_values)
        if image_features is None:
            return h
        mask = input_ids == self.config.image_token_index  # [B, T]
        n_tokens, n_feats = int(mask.sum()), image_features.shape[0]
        if n_tokens != n_feats:
            per_tile = self.config.vision.tokens_per_tile
            raise ValueError(f"the prompt has {n_tokens} image tokens (id {self.config.image_token_index}) but the "
                             f"images give {n_feats} features ({n_feats // per_tile} tiles × {per_tile}); "
                             f"each tile needs exactly {per_tile} image tokens")
        h = h.clone()
        h[mask] = image_features.to(h.dtype)
        return h

    # ----- forward --------------------------------------------------------------------------
    def hidden_states(self, h: torch.Tensor, positions: torch.Tensor, cache=None,
                      doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run the decoder on embeddings h [B, T, H] at absolute positions [T] (or [B, T] with a cache)
        → normed [B, T, H]."""
        rope = rope_angles(positions, self._inv_freq)
        if cache is not None:
            cache.begin(positions)  # per-step cache bookkeeping, done once for all layers
        for layer in self.layers:
            h = layer(h, positions, rope, cache, doc_ids)
        if cache is not None:
            cache.end()
        return self.language_model.model.norm(h)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *, image_features: torch.Tensor | None = None,
                cache=None, logits_slice: slice | None = None,
                document_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                apply_head=None) -> torch.Tensor:
        """input_ids [B, T] (+ pixel_values [n_tiles, 3, S, S]) → logits [B, T, vocab].

        position_ids: absolute positions [T] (default 0…T-1, or continuing the cache); with a cache
          also [B, T], one row of positions per sequence (batched decode).
        cache: a herd.inference KVCache; keys/values are appended to it (see cache.begin/attend/end).
        logits_slice: compute the LM head only for these positions (e.g. slice(-1, None) in decode).
        document_ids: [B, T] ids of the packed documents in each row (training): attention never
          crosses from one document into another.
        labels: [B, T] next-token targets (already shifted, -100 ignored): returns the summed
          cross-entropy (float32 scalar) instead of logits, the LM head fused with the loss in
          chunks of tokens (herd.model.loss; no [B, T, vocab] logits are ever held).
        apply_head: a function (normed hidden states [B, T, H], LM head weight [V, H]) → anything,
          returned in place of the logits: losses fused with the head outside the model (e.g.
          herd.train.distill), called inside forward so sharded (FSDP) weights are gathered.
        """
        self.check_inputs(input_ids, pixel_values)
        T = input_ids.shape[1]
        if position_ids is None:
            start = cache.next_position if cache is not None else 0
            if isinstance(start, torch.Tensor):  # rows at different positions: [B] → [B, T]
                position_ids = start.to(input_ids.device).view(-1, 1) + torch.arange(T, device=input_ids.device)
            else:
                position_ids = torch.arange(start, start + T, device=input_ids.device)
        elif position_ids.dim() == 2:
            if position_ids.shape[0] == 1 or bool((position_ids == position_ids[:1]).all()):
                position_ids = position_ids[0]
            elif cache is None and document_ids is None:
                raise ValueError("per-row position_ids need a cache (herd.inference) or document_ids (packed "
                                 "training rows); rows must match here")
        h = self.embed(input_ids, pixel_values, image_features)
        if document_ids is not None and tuple(document_ids.shape) != tuple(input_ids.shape):
            raise ValueError(f"document_ids must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(document_ids.shape)}")
        h = self.hidden_states(h, position_ids, cache, document_ids)
        if logits_slice is not None:
            h = h[:, logits_slice]
        head = self.language_model.lm_head
        if apply_head is not None:
            if type(head) is not nn.Linear or head.bias is not None:
                raise ValueError("apply_head needs a plain LM head (nn.Linear without bias), not a swapped-in one")
            return apply_head(h, head.weight)
        if labels is not None and type(head) is nn.Linear and head.bias is None:
            return linear_cross_entropy(h, head.weight, labels)
        if labels is not None:  # a swapped-in head (quantised, ...): the plain path
            return F.cross_entropy(head(h).float().flatten(0, -2), labels.flatten(), reduction="sum")
        return head(h)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, pixel_values: torch.Tensor | None = None,
             ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy; labels [B, T] are already shifted (labels[t] = target of t)."""
        logits = self(input_ids, pixel_values)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index)


def build_model(config: ModelConfig | str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                seed: int | None = 0, init: bool = True) -> Llama4:
    """A freshly initialised model from a config or preset name (random weights)."""
    if isinstance(config, str):
        from herd.presets import get_config

        config = get_config(config)
    with torch.device(device):
        model = Llama4(config)
    if init and str(device) != "meta":
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        model.init_weights(generator=gen)
    return model.to(dtype)
