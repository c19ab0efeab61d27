"""Rotary position embeddings as Llama 4 applies them.

Llama 4 rotates *interleaved* pairs (x[2i], x[2i+1]) — Meta's complex-number formulation — not
the split halves of GPT-NeoX style RoPE. The same rotation serves the text decoder (1-D positions,
optional llama3 frequency scaling) and the vision encoder (2-D patch coordinates).
"""

from __future__ import annotations

import math

import torch


def text_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] (float32, on the CPU even under a meta-device context),
    with llama3-type scaling when configured."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return inv_freq
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths (low frequencies) are slowed down by `factor`, short ones kept, and the band
    # between them interpolated smoothly.
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of positions × frequencies: positions [..., T] → ([..., T, D/2], [..., T, D/2]) float32."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, T, heads, D] by angles cos/sin [T, D/2] or [B, T, D/2].

    Computed in float32 and cast back, as the reference does: each pair is the complex number
    x[2i] + i·x[2i+1] times cos + i·sin (Meta's formulation), one kernel instead of six — the same
    products and sums as (x0·cos − x1·sin, x0·sin + x1·cos) (bit-identical on our CPUs).
    """
    xc = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))  # [B, T, h, D/2]
    if cos.dim() == 2:  # [T, D/2] → broadcast over batch and heads
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:  # [B, T, D/2]
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.view_as_real(xc * torch.complex(cos.float(), sin.float())).flatten(-2).type_as(x)


def vision_rope_angles(patches_per_side: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rotary angles for a tile's patches plus the trailing class token.

    Returns cos, sin [P*P + 1, head_dim/2]: the first head_dim/4 pairs rotate by the patch's
    column (x+1), the next head_dim/4 by its row (y+1); the class token is not rotated.
    """
    n = patches_per_side
    freq_dim = head_dim // 2
    base = 1.0 / (theta ** (torch.arange(0, freq_dim, 2, device="cpu")[: freq_dim // 2].float() / freq_dim))  # [head_dim/4]
    idx = torch.arange(n * n, device="cpu")
    col, row = (idx % n + 1).float(), (idx // n + 1).float()
    angles = torch.cat([col[:, None] * base, row[:, None] * base], dim=-1)  # [P*P, head_dim/2]
    angles = torch.cat([angles, torch.zeros(1, angles.shape[-1], device="cpu")], dim=0)  # class token: identity
    return angles.cos(), angles.sin()
