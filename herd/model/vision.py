"""The Llama 4 vision encoder, its pixel-shuffle adapter and the multi-modal projector.

tile [n, 3, S, S]
  → patch embedding (non-overlapping p×p patches, one linear)       [n, P², W]
  → append class token, add learned positions, LayerNorm            [n, P²+1, W]
  → encoder layers (2-D rotary attention, GELU MLP), LayerNorm
  → drop class token, pixel shuffle (ratio r: P² → (rP)² tokens, W → W/r²)
  → adapter MLP (GELU, GELU)                                         [n, (rP)², vision_output_dim]
  → projector (one linear) to the text width                        [n·(rP)², text hidden]
Parameter names match Hugging Face's `Llama4VisionModel` and `Llama4MultiModalProjector`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import VisionConfig
from herd.model.rope import apply_rope, vision_rope_angles


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.p = cfg.patch_size
        self.linear = nn.Linear(cfg.num_channels * self.p * self.p, cfg.hidden_size, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n, C, S, S] → [n, (S/p)², W]; patch features ordered (channel, row, col) like nn.Unfold."""
        n, c, h, w = pixels.shape
        p = self.p
        patches = pixels.view(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, -1, c * p * p)
        return self.linear(patches)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        W = cfg.hidden_size
        self.n_heads, self.head_dim = cfg.num_attention_heads, W // cfg.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(W, W), nn.Linear(W, W)
        self.v_proj, self.o_proj = nn.Linear(W, W), nn.Linear(W, W)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        n, L, _ = x.shape
        shape = (n, L, self.n_heads, self.head_dim)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(n, L, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size)
        self.self_attn = VisionAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, rope):
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x, rope):
        for layer in self.layers:
            x = layer(x, rope)
        return x


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """[n, P², W] → [n, (rP)², W/r²]: merges r⁻¹×r⁻¹ neighbourhoods of patches into one token."""
    n, L, W = x.shape
    side = int(round(L ** 0.5))
    x = x.view(n, side, int(side * ratio), int(W / ratio))  # fold columns into channels
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(side * ratio), int(side * ratio), int(W / ratio**2))  # fold rows into channels
    return x.permute(0, 2, 1, 3).reshape(n, -1, x.shape[-1])


class AdapterMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.shuffled_dim, cfg.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(cfg.projector_output_dim, cfg.projector_output_dim, bias=False)

    def forward(self, x):
        return F.gelu(self.fc2(F.gelu(self.fc1(x))))


class PixelShuffleAdapter(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ratio = cfg.pixel_shuffle_ratio
        self.mlp = AdapterMLP(cfg)

    def forward(self, x):
        return self.mlp(pixel_shuffle(x, self.ratio))


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        W, P = cfg.hidden_size, cfg.patches_per_side
        self.patch_embedding = PatchEmbedding(cfg)
        self.class_embedding = nn.Parameter(torch.empty(W))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(P * P + 1, W))
        self.layernorm_pre = nn.LayerNorm(W)
        self.layernorm_post = nn.LayerNorm(W)
        self.model = VisionEncoder(cfg)
        self.vision_adapter = PixelShuffleAdapter(cfg)
        # float32 angles kept outside the module's buffers so model.to(bfloat16) cannot round them
        self._rope = vision_rope_angles(P, W // cfg.num_attention_heads, cfg.rope_theta)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [n_tiles, C, S, S] → [n_tiles, tokens_per_tile, vision_output_dim]."""
        x = self.patch_embedding(pixels)  # [n, P², W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1) + self.positional_embedding_vlm.to(x.dtype)  # [n, P²+1, W]
        x = self.layernorm_pre(x)
        rope = tuple(t.to(x.device) for t in self._rope)
        x = self.model(x, rope)
        x = self.layernorm_post(x)[:, :-1]  # drop the class token
        return self.vision_adapter(x)


class MultiModalProjector(nn.Module):
    def __init__(self, vision_output_dim: int, text_hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_output_dim, text_hidden, bias=False)  # no bias, as published

    def forward(self, x):
        return self.linear_1(x)
