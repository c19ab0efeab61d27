"""Text self-attention with iRoPE: chunked-local RoPE layers interleaved with global NoPE layers.

Per layer (placement from the config):
  * RoPE layer  — rotary positions, optional weightless L2 QK-norm, causal attention *within*
                  fixed chunks of `attention_chunk_size` positions (chunk = position // size);
  * NoPE layer  — no positions at all, causal attention over the whole sequence, and at inference
                  the query scaled by log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1.

No T×T mask is ever built: global layers use SDPA's causal kernel (blockwise on CPU); chunked
layers fold the chunks into the batch dimension, so memory is O(T · chunk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import TextConfig
from herd.model.rope import apply_rope


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS normalisation over the last dim (Llama 4's QK-norm), computed in float32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def temperature_scale(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Query multiplier for NoPE layers at absolute positions [..., T] (float32)."""
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """SDPA; when training on a CPU in bf16/fp16, computed in float32 and cast back: the CPU
    flash-attention backward is 1.3–2× slower in bf16 than in float32 (measured on the tiny
    preset's shapes), and the float32 result is the more exact one."""
    if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kw)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, h, T, D], k/v [B, kv, T, D] → [B, h, T, D]; GQA handled by SDPA."""
    return _sdpa(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def chunked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int,
                             start: int = 0) -> torch.Tensor:
    """Causal attention restricted to chunks of absolute positions [c·chunk, (c+1)·chunk).

    q [B, h, T, D], k/v [B, kv, T, D], positions start … start+T-1 (the same for every row).
    Chunks are folded into the batch: [B, h, n·chunk, D] → [B·n, h, chunk, D].
    """
    B, h, T, D = q.shape
    if start % chunk + T <= chunk:  # the whole input sits inside one chunk (no padding to the chunk size)
        return causal_attention(q, k, v)
    lead = (chunk - start % chunk) % chunk  # tokens before the first chunk boundary
    parts = []
    if lead:
        parts.append(causal_attention(q[:, :, :lead], k[:, :, :lead], v[:, :, :lead]))
    rest = T - lead
    n = -(-rest // chunk)
    pad = n * chunk - rest

    def fold(x):  # [B, hh, rest, D] → [B·n, hh, chunk, D]
        x = x[:, :, lead:]
        if pad:
            x = F.pad(x, (0, 0, 0, pad))  # padded queries sit after every real key: causal keeps them out
        return x.unflatten(2, (n, chunk)).transpose(1, 2).flatten(0, 1)

    out = causal_attention(fold(q), fold(k), fold(v))  # [B·n, h, chunk, D]
    out = out.unflatten(0, (B, n)).transpose(1, 2).flatten(2, 3)[:, :, :rest]
    parts.append(out)
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns each query's log-sum-exp, so that attention over disjoint key
    ranges can be combined exactly with `merge_attention` (the KV cache attends over its cached
    prefix and the new keys separately, never building a [T, context] mask).

    q [B, h, T, D], k/v [B, kv, S, D] (kv divides h; strided views are fine) → out [B, h, T, D]
    in q's dtype, lse [B, h, T] float32. causal: query t sees keys ≤ t (T == S). mask: additive,
    in q's dtype, broadcastable to [B, 1, T, S] (0 keep, -inf drop).
    Same kernel as SDPA's CPU path (flash attention), which is what `causal_attention` runs.
    """
    B, h, T, D = q.shape
    kv = k.shape[1]
    g = h // kv
    if g > 1 and not causal and (mask is None or mask.shape[-2] == 1):
        # Grouped-query attention without copying keys: the g query heads that share a KV head
        # become g·T queries of that head (exact while the mask does not vary along queries).
        out, lse = _flash(q.reshape(B, kv, g * T, D), k, v, False, mask)
        out, lse = out.reshape(B, h, T, D), lse.reshape(B, h, T)
    else:
        if g > 1:
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        out, lse = _flash(q, k, v, causal, mask)
    if mask is not None:  # a query that sees no key here contributes nothing (the kernel says lse 0)
        lse = lse.masked_fill(torch.isneginf(mask).all(-1), float("-inf"))  # [B|1, 1, T|1] broadcasts
    return out, lse


def _flash(q, k, v, causal, mask):
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask)
    # elsewhere: explicit scores (same maths; used only off-CPU)
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1),
                                    float("-inf"))
    if mask is not None:
        scores = scores + mask.float()
    lse = torch.logsumexp(scores, -1)
    return (torch.exp(scores - lse[..., None]) @ v.float()).to(q.dtype), lse


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combine attention outputs over disjoint key ranges, given each part's (out, lse)."""
    if len(parts) == 1:
        return parts[0][0]
    lse = torch.stack([p[1] for p in parts])  # [P, B, h, T]
    w = torch.softmax(lse, dim=0)  # each part's share of the total softmax mass
    out = sum(o.float() * w[i][..., None] for i, (o, _) in enumerate(parts))
    return out.to(parts[0][0].dtype)


MAX_DOCUMENT_MASK_LEN = 16384


def document_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor,
                              chunk: int | None = None, start: int = 0,
                              positions: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention that never crosses a document boundary (training on packed rows, as Meta
    trains Llama 3/4): query t sees key s ≤ t only if doc_ids[b, s] == doc_ids[b, t] and, on a
    chunked layer, s lies in t's chunk. q [B, h, T, D], k/v [B, kv, T, D], doc_ids [B, T].
    Chunks follow `positions` ([T] or [B, T]; packed SFT rows restart them at each example) when
    given, else start … start+T-1.

    Builds a boolean [B, 1, T, T] mask: meant for training-length rows, refused past 16k tokens.
    """
    B, h, T, D = q.shape
    if T > MAX_DOCUMENT_MASK_LEN:
        raise ValueError(f"document masking builds a T×T mask; rows of {T} tokens are too long "
                         f"(max {MAX_DOCUMENT_MASK_LEN})")
    pos = torch.arange(T, device=q.device)
    allowed = pos[None, :] <= pos[:, None]  # [T, T] causal
    allowed = allowed[None] & (doc_ids[:, :, None] == doc_ids[:, None, :])  # [B, T, T]
    if chunk is not None:
        c = (pos + start if positions is None else positions.to(q.device)) // chunk  # [T] or [B, T]
        allowed = allowed & (c[..., None, :] == c[..., :, None])
    return _sdpa(q, k, v, attn_mask=allowed[:, None], enable_gqa=h != k.shape[1])


class Attention(nn.Module):
    """One text attention layer. Parameter names match Hugging Face's `Llama4TextAttention`."""

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.use_rope = cfg.uses_rope(layer)
        self.chunk = cfg.attention_chunk_size if cfg.is_chunked(layer) else None
        self.qk_norm = cfg.use_qk_norm and self.use_rope
        self.temperature_tuning = cfg.temperature_tuning and not self.use_rope
        self.floor_scale, self.attn_scale, self.eps = cfg.floor_scale, cfg.attn_scale, cfg.rms_norm_eps
        H, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=bias)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three input projections (herd.inference fuses them into one product)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def project(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """x [B, T, H] → q [B, T, h, D], k/v [B, T, kv, D] with RoPE / QK-norm / temperature applied."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.use_rope:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.qk_norm:
            q, k = l2_norm(q, self.eps), l2_norm(k, self.eps)
        if self.temperature_tuning:
            scale = temperature_scale(positions, self.floor_scale, self.attn_scale)  # [T] or [B, T]
            scale = scale.view(1, T, 1, 1) if scale.dim() == 1 else scale.view(B, T, 1, 1)
            q = (q * scale).to(q.dtype)
        return q, k, v

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache=None, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, H], positions [T] (absolute, contiguous) or [B, T] → [B, T, H].

        With `cache` (see herd.inference), keys/values are appended to it and attention spans the
        cached positions as well; the cache supplies the mask. With `doc_ids` [B, T] (training on
        packed rows), attention stays inside each document.
        """
        B, T, _ = x.shape
        q, k, v = self.project(x, positions, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        if cache is not None:
            out = cache.attend(self.layer, q, k, v, positions, chunk=self.chunk)
        elif doc_ids is not None or self.chunk is not None:
            start = int(positions.reshape(-1)[0]) if positions.numel() else 0
            if doc_ids is not None:
                out = document_causal_attention(q, k, v, doc_ids, self.chunk, positions=positions)
            else:
                out = chunked_causal_attention(q, k, v, self.chunk, start)
        else:
            out = causal_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
