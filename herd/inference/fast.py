"""Decode-friendly kernels, swapped into a loaded model for serving (weights unchanged).

`optimize_for_inference(model)` replaces, in the text decoder:
  * nn.Linear → FastLinear: one row (decode at batch 1) runs as a matrix-vector product that
    streams the weight at close to memory bandwidth (herd's native bf16 kernel, else torch.mv —
    both far ahead of F.linear at one row); several rows (prefill) use a oneDNN-prepacked copy of
    the weight (see DenseKernel);
  * the fused expert weights → KernelExperts: one [out, in] kernel per expert, so a token only
    touches its expert's weights (no grouped GEMM machinery for a handful of tokens);
  * MoE → FastMoE: a subclass whose single-token path (decode at batch 1) indexes the chosen
    expert directly: route, one expert, shared expert, add — nothing else;
  * q/k/v projections → one product (FastAttention.qkv), and gate/up of every SwiGLU (shared
    expert, dense MLP) → one product (FastSwiGLU): fewer, larger matrix-vector products.
Quantized models (herd.inference.quant) plug int8/int4 kernels into the same two containers.
With top-1 routing the model also gets the batch-1 decode step of herd.inference.single, which
engine.forward_step uses for one token of one sequence.

The result is for inference only (no gradients). Weights are shared, not copied.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from herd.model.attention import Attention
from herd.model.moe import MoE, SwiGLU


def can_pack(w: torch.Tensor) -> bool:
    """oneDNN prepacking applies to bf16 weights on CPU."""
    return (w.device.type == "cpu" and w.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def dense_matvec(w: torch.Tensor):
    """x [K] ↦ w @ x for a dense weight w [N, K], by the fastest kernel that takes it: herd's native
    bf16 kernel (herd.inference.native: bf16 weights, K % 64 == 0, a CPU with AVX512-BF16; it
    streams ~29 GB/s here where torch.mv streams ~23), else torch.mv."""
    from herd.inference import native

    if w.dtype == torch.bfloat16 and native.supports(w):
        return functools.partial(native.op("bf16_gemv"), w)
    return functools.partial(torch.mv, w)


class DenseKernel:
    """y = x @ W.T for W [out, in] in the compute dtype.

    One row (decode at batch 1): `matvec` (dense_matvec: the native bf16 kernel, else torch.mv).
    Measured here (2 threads, bf16, 6–8 MB matrices in cache): mv 28–31 GB/s, a oneDNN-prepacked
    weight 21–24 GB/s, F.linear 16–18 GB/s; streaming 1 GiB from memory, as decode does, mv reads
    21–25 GB/s and the native kernel 25–29 GB/s.
    Several rows (prefill, batched decode): a copy of the weight prepacked once for oneDNN (bf16
    on CPU), which F.linear would otherwise re-layout on every call — prefill runs about 2× faster
    with it. pack=False skips the copy (half the weight memory, slower prefill).
    """

    def __init__(self, w: torch.Tensor, pack: bool = True):
        self.out_features, self.in_features = w.shape
        self.w = w.detach().contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.w, 64) if pack and can_pack(self.w) else None
        self.matvec = dense_matvec(self.w)  # x [in] → [out]

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.numel() == self.in_features:
            y = self.matvec(x.reshape(-1)).view(*x.shape[:-1], self.out_features)
            return y if bias is None else y + bias
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
        return F.linear(x, self.w, bias)

    def dequantize(self, a: int = 0, b: int | None = None) -> torch.Tensor:
        return self.w[a:b]


class FastLinear(nn.Module):
    """An nn.Linear whose product runs through a kernel (dense, int8, int4)."""

    def __init__(self, kernel, bias: torch.Tensor | None = None):
        super().__init__()
        self.kernel = kernel
        self.in_features, self.out_features = kernel.in_features, kernel.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, pack: bool = True) -> "FastLinear":
        new = cls(DenseKernel(linear.weight, pack), linear.bias)
        new.weight = nn.Parameter(new.kernel.w, requires_grad=False)  # the same tensor: state_dict stays whole
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={type(self.kernel).__name__}"


def bucket(m: int) -> int:
    """Rows an expert product is padded to: m itself up to 4, then powers of two up to 64, then
    multiples of 64 — a bounded set of shapes (each new shape costs oneDNN a kernel build and
    cache memory) for at most 2× rows on tiny products and < 64 extra rows on large ones."""
    if m <= 4:
        return m
    if m <= 64:
        return 1 << (m - 1).bit_length()
    return -(-m // 64) * 64


class KernelExperts(nn.Module):
    """Routed experts as per-expert kernels: gate_up[e] [2I, H] and down[e] [H, I] (out × in)."""

    def __init__(self, gate_up: list, down: list):
        super().__init__()
        self.gate_up, self.down = gate_up, down
        self.num_experts = len(gate_up)
        self.inner = down[0].in_features

    @classmethod
    def from_experts(cls, experts, pack: bool = True) -> "KernelExperts":
        gu = [DenseKernel(w.t(), pack) for w in experts.gate_up_proj.detach().unbind(0)]  # [H, 2I] → [2I, H]
        dn = [DenseKernel(w.t(), pack) for w in experts.down_proj.detach().unbind(0)]  # [I, H] → [H, I]
        return cls(gu, dn)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on rows x [M, H] (already scaled by their gate) → [M, H]."""
        M = x.shape[0]
        padded = bucket(M)
        if padded != M:  # few distinct shapes: oneDNN builds (and caches) a kernel per shape
            x = F.pad(x, (0, 0, 0, padded - M))
        gate, up = self.gate_up[e](x).chunk(2, dim=-1)
        y = self.down[e](F.silu(gate) * up)
        return y[:M] if padded != M else y

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        """Same contract as herd.model.moe.Experts: rows grouped by expert (counts [E]) → [M, H]."""
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                outs.append(self.expert(e, x_sorted[start:start + n]))
                start += n
        return torch.cat(outs) if outs else x_sorted.new_zeros(0, x_sorted.shape[-1])


class FastMoE(MoE):
    """MoE with a direct path for one token and one expert (decode at batch 1)."""

    plain_routing = False  # set when expert_bias is all zero (checked once, not per token)

    def route(self, x: torch.Tensor):
        if not self.plain_routing:
            return super().route(x)
        logits = self.router(x)
        top_ids = logits.topk(self.top_k, dim=-1).indices
        return logits, top_ids, torch.sigmoid(logits.gather(-1, top_ids).float()).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.training or self.top_k != 1 or x.numel() != shape[-1] or not isinstance(self.experts, KernelExperts):
            return super().forward(x)
        x = x.reshape(1, shape[-1])
        _, top_ids, gates = self.route(x)
        y = self.experts.expert(int(top_ids), x * gates)
        return (self.shared_expert(x) + y).view(shape)


class FastAttention(Attention):
    """Attention whose q/k/v projections run as one product (`qkv_proj`, rows q | k | v)."""

    def qkv(self, x: torch.Tensor):
        return self.qkv_proj(x).split(self.qkv_sizes, dim=-1)


class FastSwiGLU(SwiGLU):
    """SwiGLU whose gate and up projections run as one product (`gate_up`, rows gate | up)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def fuse_linears(mods: list) -> nn.Module:
    """One module computing the concatenated outputs of several Linears (or QuantLinears) of the
    same input: Linear weights are stacked by rows; quantized ones stack their buffers (the
    per-output-channel scales stack with them)."""
    if all(type(m) is nn.Linear for m in mods):
        fused = nn.Linear(mods[0].in_features, sum(m.out_features for m in mods), bias=mods[0].bias is not None,
                          device="meta")
        fused.weight = nn.Parameter(torch.cat([m.weight.detach() for m in mods]), requires_grad=False)
        if mods[0].bias is not None:
            fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in mods]), requires_grad=False)
        return fused
    fuse = getattr(type(mods[0]), "fuse", None)
    if fuse is None or any(type(m) is not type(mods[0]) for m in mods):
        raise ValueError(f"cannot fuse {[type(m).__name__ for m in mods]}")
    return fuse(mods)


def _swap_linears(module: nn.Module, make, skip=()) -> None:
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear and name not in skip:
            setattr(module, name, make(child))
        elif not isinstance(child, (FastLinear, KernelExperts)):
            _swap_linears(child, make, skip)


@torch.no_grad()
def optimize_for_inference(model, pack: bool = True, compile: bool = False):
    """Swap in the fast kernels (in place) and return the model; see the module docstring.
    pack: keep a oneDNN-prepacked copy of bf16 weights for multi-row products (prefill).
    compile: torch.compile the batch-1 decode step's per-layer maths (herd.inference.single)."""
    model.eval()
    lm = model.language_model
    for layer in lm.model.layers:
        a = layer.self_attn
        if not isinstance(a, FastAttention):
            a.qkv_proj = fuse_linears([a.q_proj, a.k_proj, a.v_proj])
            a.qkv_sizes = [a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features]
            del a.q_proj, a.k_proj, a.v_proj
            a.__class__ = FastAttention
        ff = layer.feed_forward
        mlps = [ff.shared_expert] if isinstance(ff, MoE) else [ff]
        for mlp in mlps:
            if not isinstance(mlp, FastSwiGLU):
                mlp.gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj])
                del mlp.gate_proj, mlp.up_proj
                mlp.__class__ = FastSwiGLU
        if isinstance(ff, MoE):
            if not isinstance(ff.experts, KernelExperts):
                ff.experts = KernelExperts.from_experts(ff.experts, pack)
            ff.__class__ = FastMoE
            ff.plain_routing = not bool(ff.expert_bias.any())
    _swap_linears(lm, lambda lin: FastLinear.from_linear(lin, pack))
    for p in model.parameters():
        p.requires_grad_(False)
    model._single_decoder = None
    if all(ff.top_k == 1 for ff in model.moe_layers()):
        from herd.inference.single import SingleDecoder

        model._single_decoder = SingleDecoder(model, compile=compile)  # decode at batch 1 (engine.forward_step)
    return model
