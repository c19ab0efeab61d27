"""Next-token cross-entropy fused with the LM head, in chunks of tokens (training).

`F.cross_entropy(lm_head(h).float(), labels)` materialises the logits of every token [N, V] —
under bf16 autocast twice (bf16, then float32) — and its backward a zero-filled [N, V] gradient,
the log-softmax backward and a float32 → bf16 cast of it: at the tiny preset's vocabulary of
8,192 that is a quarter of a CPU training step. Here the tokens go through in chunks: each
chunk's logits, log-softmax, loss and gradient (softmax − one-hot) are computed at once and the
gradients with respect to the hidden states and the head's weight accumulated right away. The
loss is a scalar, so backward only scales them by the incoming gradient. Memory O(chunk · V).

Numerics follow the unfused path: logits in the matmul dtype (bf16 under autocast, as F.linear
gives them), log-softmax in float32, the logits' gradient cast to the matmul dtype before the two
products (as autograd casts it). The weight gradient is summed over chunks in float32.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 21  # logits per chunk (8 MiB in float32; 1–4 Mi measured alike on the tiny preset)


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) is not None:
        return torch.get_autocast_dtype(dev)
    return h.dtype


def _chunked(h, weight, labels, ignore_index, dtype, chunk, want_h, want_w):
    """(loss summed over the kept tokens, d loss / d h or None, d loss / d weight (float32) or None)."""
    with torch.autocast(h.device.type, enabled=False):
        hc, wc = h.to(dtype), weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_w else None
        for s in range(0, h.shape[0], chunk):
            x, t = hc[s:s + chunk], labels[s:s + chunk]
            logp = torch.log_softmax((x @ wc.T).float(), dim=-1)  # [n, V] float32
            keep = t != ignore_index
            t0 = t.masked_fill(~keep, 0)
            picked = logp.gather(1, t0[:, None]).squeeze(1)  # [n] log-probability of each target
            loss -= picked.masked_fill(~keep, 0.0).sum()
            if not (want_h or want_w):
                continue
            # softmax − one-hot, in the matmul dtype; the targets' entries computed in float32
            g = logp.exp_() if dtype == torch.float32 else torch.exp(logp, out=torch.empty_like(logp, dtype=dtype))
            g[torch.arange(t.shape[0], device=t.device), t0] = (picked.exp() - 1.0).to(dtype)
            if not bool(keep.all()):
                g.mul_(keep[:, None])  # ignored tokens contribute nothing
            if want_h:
                grad_h[s:s + chunk] = g @ wc
            if want_w:
                grad_w += g.T @ x
    return loss, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index, dtype, chunk):
        loss, grad_h, grad_w = _chunked(h, weight, labels, ignore_index, dtype, chunk,
                                        ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.grads = (grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "sum", chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of the logits h @ weight.T against labels, never holding all the logits.

    h [..., H], weight [V, H] (the LM head), labels [...] (already shifted; `ignore_index` skipped)
    → float32 scalar, summed over the kept tokens (reduction "sum") or their mean ("mean").
    Equals F.cross_entropy(F.linear(h, weight).float().flatten(0, -2), labels.flatten(),
    reduction=...) in value and gradients (to float32 rounding), under autocast too.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    h2, y = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    if h2.shape[0] != y.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match the hidden states {tuple(h.shape)}")
    dtype = _compute_dtype(h, weight)
    chunk = chunk_size or max(64, CHUNK_ELEMENTS // weight.shape[0])
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        total = _LinearCrossEntropy.apply(h2, weight, y, ignore_index, dtype, chunk)
    else:
        total = _chunked(h2, weight, y, ignore_index, dtype, chunk, False, False)[0]
    if reduction == "mean":
        total = total / (y != ignore_index).sum()
    return total
