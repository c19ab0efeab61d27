"""FP8 training: linear and expert matmuls with float8 inputs and dynamic scales.

Recipe (as in Llama 4 / DeepSeek-V3 / torchao float8 training):
  forward  — both GEMM operands in float8 e4m3 (max 448), scaled by their current absolute max;
  backward — the incoming gradient in float8 e5m2 (max 57344), wider range for gradients;
  scales   — "tensorwise" (one scale per tensor) or "rowwise" (one per row along the contraction
             dimension, i.e. per token for activations and per output channel for weights).

On a CPU (and on GPUs without FP8 tensor cores) the arithmetic is *emulated*: operands are
quantised to float8 and dequantised (values exactly as FP8 hardware sees them), then multiplied
in float32. On CUDA GPUs with FP8 support (sm89+), linear layers run their forward GEMM with
`torch._scaled_mm` on real float8 tensors.

Precision-sensitive layers stay in high precision: the LM head, the MoE router, embeddings, norms
and the vision tower (as in Meta's and DeepSeek's recipes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: torch.finfo(E4M3).max, E5M2: torch.finfo(E5M2).max}
RECIPES = ("tensorwise", "rowwise")


def quantize(x: torch.Tensor, dtype: torch.dtype = E4M3, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x → (float8 values, float32 dequantisation scale). dim=None: one scale for the tensor;
    otherwise one scale per slice along `dim` (amax over `dim`, kept for broadcasting)."""
    xf = x.float()
    amax = xf.abs().amax() if dim is None else xf.abs().amax(dim=dim, keepdim=True)
    scale = amax.clamp(min=1e-12) / FP8_MAX[dtype]
    q = (xf / scale).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def qdq(x: torch.Tensor, dtype: torch.dtype, dim: int | None) -> torch.Tensor:
    """Quantise to float8 and back: the values an FP8 GEMM actually multiplies."""
    q, s = quantize(x, dtype, dim)
    return dequantize(q, s, x.dtype)


class _FakeQuant(torch.autograd.Function):
    """Forward: x as float8 e4m3 sees it. Backward: straight through."""

    @staticmethod
    def forward(ctx, x, dim):
        return qdq(x, E4M3, dim)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _QuantGrad(torch.autograd.Function):
    """Forward: identity. Backward: the gradient as float8 e5m2 sees it."""

    @staticmethod
    def forward(ctx, y, dim):
        ctx.dim = dim
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return qdq(g, E5M2, ctx.dim), None


def _dims(recipe: str) -> int | None:
    if recipe not in RECIPES:
        raise ValueError(f"unknown FP8 recipe {recipe!r}; choose {' or '.join(RECIPES)}")
    return -1 if recipe == "rowwise" else None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: str = "tensorwise") -> torch.Tensor:
    """y = x @ weight.T with e4m3 operands and an e5m2 gradient (emulated)."""
    d = _dims(recipe)
    y = F.linear(_FakeQuant.apply(x, d), _FakeQuant.apply(weight, d))
    return _QuantGrad.apply(y, d)


def scaled_mm_available(device: torch.device) -> bool:
    return (device.type == "cuda" and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9))


class _ScaledMMLinear(torch.autograd.Function):
    """Real FP8 forward on CUDA via torch._scaled_mm; backward emulated from the same float8 values."""

    @staticmethod
    def forward(ctx, x2d, weight, recipe):
        rowwise = recipe == "rowwise"
        xq, xs = quantize(x2d, E4M3, -1 if rowwise else None)  # [N, K], scale [N, 1] or []
        wq, ws = quantize(weight, E4M3, -1 if rowwise else None)  # [O, K], scale [O, 1] or []
        y = torch._scaled_mm(xq, wq.t(), scale_a=xs.reshape(-1, 1) if rowwise else xs,
                             scale_b=ws.reshape(1, -1) if rowwise else ws, out_dtype=torch.bfloat16)
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.recipe, ctx.dtypes = recipe, (x2d.dtype, weight.dtype)
        return y.to(x2d.dtype)

    @staticmethod
    def backward(ctx, g):
        xq, xs, wq, ws = ctx.saved_tensors
        gq = qdq(g, E5M2, -1 if ctx.recipe == "rowwise" else None).float()
        x, w = dequantize(xq, xs), dequantize(wq, ws)
        return (gq @ w).to(ctx.dtypes[0]), (gq.t() @ x).to(ctx.dtypes[1]), None


class FP8Linear(nn.Linear):
    """nn.Linear whose matmul runs in FP8 (same parameters, so checkpoints are unchanged)."""

    fp8_recipe: str = "tensorwise"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if (scaled_mm_available(x.device) and self.bias is None and shape[-1] % 16 == 0
                and self.out_features % 16 == 0):
            y = _ScaledMMLinear.apply(x.reshape(-1, shape[-1]), self.weight, self.fp8_recipe)
            return y.view(*shape[:-1], -1)
        y = fp8_linear(x, self.weight, self.fp8_recipe)
        return y if self.bias is None else y + self.bias


def fp8_grouped_matmul(recipe: str):
    """A grouped-matmul function for MoE experts with FP8 operands (weights scaled per expert and
    output channel in rowwise mode, per expert in tensorwise mode)."""
    from herd.model.moe import grouped_matmul

    d = _dims(recipe)

    def matmul(x, w, counts, offsets, impl="auto"):
        # x [M, K] rows scaled over K; w [E, K, N] scaled over K per (expert, column) or per expert
        wq = _FakeQuant.apply(w, 1) if d is not None else _PerExpert.apply(w)
        y = grouped_matmul(_FakeQuant.apply(x, d), wq, counts, offsets, impl)
        return _QuantGrad.apply(y, d)

    return matmul


class _PerExpert(torch.autograd.Function):
    """Tensorwise scaling within each expert of a fused [E, K, N] weight; straight-through backward."""

    @staticmethod
    def forward(ctx, w):
        return qdq(w, E4M3, (1, 2))

    @staticmethod
    def backward(ctx, g):
        return g


HIGH_PRECISION = ("lm_head", "router", "vision_model", "multi_modal_projector", "embed_tokens")


def convert_to_fp8(model: nn.Module, recipe: str = "tensorwise") -> int:
    """Switch the decoder's linear layers and MoE experts to FP8 in place. Returns how many
    modules were converted. The LM head, routers, embeddings and vision tower stay high precision."""
    _dims(recipe)
    n = 0
    for name, module in model.named_modules():
        if any(part in name for part in HIGH_PRECISION):
            continue
        if type(module) is nn.Linear:
            module.__class__ = FP8Linear
            module.fp8_recipe = recipe
            n += 1
        elif module.__class__.__name__ == "Experts":
            module.matmul = fp8_grouped_matmul(recipe)
            n += 1
    return n
