"""Getting a model ready for inference: a separate, inference-only model built from its weights.

    fast = optimize_for_inference(model)     # explicit; `model` is left exactly as it was
    view = inference_view(model)             # what herd.generate / herd.Engine / Session call: the
                                             # same, cached per model until its weights change
    model = herd.load_model(path, for_inference=True)   # load straight into the prepared form

Nobody has to ask for speed: herd.generate, herd.generate_stream, herd.Engine and Session call
`inference_view`, which hands back a prepared copy of a trainable CPU model (built once, rebuilt when
an optimizer step or a load changes any weight) and passes prepared or foreign models through.
The trainable model is never touched: not its classes, not its parameters, not its train/eval mode.

The prepared model is an `InferenceLlama4`, a Llama4 whose text decoder's modules are replaced
(child by child, with setattr, as pytorch-labs/gpt-fast swaps in quantized modules; never by
changing a live module's class) by:
  * nn.Linear → FastLinear: one row (decode at batch 1) runs as a matrix-vector product that
    streams the weight at close to memory bandwidth (herd's native bf16 kernel, else torch.mv —
    both far ahead of F.linear at one row); several rows (prefill) use a oneDNN-prepacked copy of
    the weight (see DenseKernel);
  * the fused expert weights → KernelExperts: one [out, in] kernel per expert, so a token only
    touches its expert's weights (no grouped GEMM machinery for a handful of tokens);
  * MoE → FastMoE, whose single-token path (decode at batch 1) indexes the chosen expert directly:
    route, one expert, shared expert, add — nothing else;
  * Attention → FastAttention: q/k/v projections as one product (`qkv_proj`, rows q | k | v);
    SwiGLU (shared expert, dense MLP) → FastSwiGLU: gate/up as one product (`gate_up`).
Quantized models (herd.inference.quant) plug int8/int4 kernels into the same containers. The
batch-1 decode step (herd.inference.single) is built on top by whoever decodes: the Engine and
Session hold their own.

Weights are shared with the source model wherever their layout stays (embeddings, norms, o_proj,
routers, the LM head, the vision tower); q|k|v, gate|up and the per-expert [out, in] matrices are
new tensors, so a prepared copy of a model that is kept costs about its weights once more (plus
oneDNN's packed copies in bf16). `herd.load_model(path, for_inference=True)` drops the trainable
form instead. The prepared model has no gradients, and `train()` on it raises: train the model it
was prepared from.
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from herd.model.attention import Attention
from herd.model.llama4 import Llama4
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


class InferenceLlama4(Llama4):
    """A Llama4 prepared for inference (see the module docstring): fused projections, decode
    kernels, frozen weights. `train()` raises; `eval()` is a no-op."""

    def train(self, mode: bool = True):
        if mode:
            raise ValueError(
                "this model was prepared for inference (herd.inference.optimize_for_inference, "
                "herd.load_model(..., for_inference=True), or a herd-quantized directory): its projections are fused "
                "and its weights frozen, so it cannot be trained. Train the model it was prepared from, or load the "
                "checkpoint with herd.load_model(path).")
        return super().train(False)


class FastMoE(MoE):
    """MoE with a direct path for one token and one expert (decode at batch 1)."""

    plain_routing = False  # expert_bias is all zero (checked once, when built, not per token)

    @classmethod
    def from_moe(cls, moe: MoE, config, pack: bool = True) -> "FastMoE":
        """A FastMoE holding moe's router, bias and shared expert, and its experts as kernels."""
        with torch.device("meta"):
            new = cls(config)  # placeholders on meta (no memory), all replaced below
        new.router, new.impl = moe.router, moe.impl
        new.register_buffer("expert_bias", moe.expert_bias, persistent=False)
        new.experts = moe.experts if isinstance(moe.experts, KernelExperts) else KernelExperts.from_experts(
            moe.experts, pack)
        new.shared_expert = FastSwiGLU.from_swiglu(moe.shared_expert)
        new.plain_routing = not bool(moe.expert_bias.any())
        return new

    def route(self, x: torch.Tensor):
        if not self.plain_routing:
            return super().route(x)
        logits = self.router(x)
        top_ids = logits.topk(self.top_k, dim=-1).indices
        return logits, top_ids, torch.sigmoid(logits.gather(-1, top_ids).float()).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.top_k != 1 or x.numel() != shape[-1]:
            return super().forward(x)
        x = x.reshape(1, shape[-1])
        _, top_ids, gates = self.route(x)
        y = self.experts.expert(int(top_ids), x * gates)
        return (self.shared_expert(x) + y).view(shape)


class FastAttention(Attention):
    """Attention whose q/k/v projections run as one product (`qkv_proj`, rows q | k | v)."""

    @classmethod
    def from_attention(cls, a: Attention, config) -> "FastAttention":
        with torch.device("meta"):
            new = cls(config, a.layer)  # same settings; its meta projections are replaced below
        del new.q_proj, new.k_proj, new.v_proj
        new.qkv_proj = fuse_linears([a.q_proj, a.k_proj, a.v_proj])
        new.qkv_sizes = [a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features]
        new.o_proj = a.o_proj
        return new

    def qkv(self, x: torch.Tensor):
        return self.qkv_proj(x).split(self.qkv_sizes, dim=-1)


class FastSwiGLU(SwiGLU):
    """SwiGLU whose gate and up projections run as one product (`gate_up`, rows gate | up)."""

    @classmethod
    def from_swiglu(cls, mlp: SwiGLU) -> "FastSwiGLU":
        with torch.device("meta"):
            new = cls(mlp.gate_proj.in_features, mlp.gate_proj.out_features)
        del new.gate_proj, new.up_proj
        new.gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj])
        new.down_proj = mlp.down_proj
        return new

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


def _swap_linears(module: nn.Module, make) -> None:
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, make(child))
        elif not isinstance(child, (FastLinear, KernelExperts)):
            _swap_linears(child, make)


# ----- building the prepared model -------------------------------------------------------------------
def inference_skeleton(model: Llama4) -> InferenceLlama4:
    """An InferenceLlama4 with the same modules as `model` (a plain Llama4) and its tensors —
    parameters and buffers, shared, not copied — still in the trainable layout. `model` is not
    modified. herd.inference.quant quantizes this before install_kernels."""
    if isinstance(model, InferenceLlama4):
        raise ValueError("the model is already prepared for inference; start from the trainable model")
    if not isinstance(model, Llama4):
        raise ValueError(f"expected a herd Llama4, got {type(model).__name__}")
    with torch.device("meta"):
        view = InferenceLlama4(model.config)
    state = model.state_dict()  # detached tensors sharing the model's storage
    view.load_state_dict(state, assign=True, strict=False)
    if model.config.text.tie_word_embeddings:
        view.language_model.lm_head.weight = view.language_model.model.embed_tokens.weight
    for name, buf in model.named_buffers():  # the non-persistent ones (MoE expert_bias)
        if name not in state:
            owner, _, leaf = name.rpartition(".")
            view.get_submodule(owner).register_buffer(leaf, buf.detach(), persistent=False)
    left = [n for n, t in [*view.named_parameters(), *view.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"cannot prepare this model for inference: {left[:5]} have no weights")
    return view.eval()


@torch.no_grad()
def install_kernels(model: InferenceLlama4, pack: bool = True) -> InferenceLlama4:
    """Replace the text decoder's modules of a prepared model that nothing else holds by their
    inference forms (module docstring); returns it."""
    cfg = model.config.text
    lm = model.language_model
    for layer in lm.model.layers:
        if not isinstance(layer.self_attn, FastAttention):
            layer.self_attn = FastAttention.from_attention(layer.self_attn, cfg)
        ff = layer.feed_forward
        if isinstance(ff, MoE) and not isinstance(ff, FastMoE):
            layer.feed_forward = FastMoE.from_moe(ff, cfg, pack)
        elif isinstance(ff, SwiGLU) and not isinstance(ff, FastSwiGLU):
            layer.feed_forward = FastSwiGLU.from_swiglu(ff)
    _swap_linears(lm, lambda lin: FastLinear.from_linear(lin, pack))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def optimize_for_inference(model, pack: bool = True) -> InferenceLlama4:
    """A model prepared for inference, built from `model`'s weights (module docstring); `model`
    itself is left as it was. A prepared model is returned as it is.
    pack: keep a oneDNN-prepacked copy of bf16 weights for multi-row products (prefill)."""
    if isinstance(model, InferenceLlama4):
        return model
    return install_kernels(inference_skeleton(model), pack)


# ----- the cached view used by generate / Engine / Session ---------------------------------------------
def weights_version(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of `model` is replaced or changed in place (optimizer
    steps, load_state_dict, `with torch.no_grad(): p.copy_(…)` all bump torch's version counters).
    Writes through `.data` bypass the counters: build the view again (optimize_for_inference)."""
    out = []
    for t in [*model.parameters(), *model.buffers()]:
        try:
            v = t._version
        except RuntimeError:  # an inference-mode tensor: it cannot change in place outside inference mode
            v = -1
        out.append((t.data_ptr(), v))
    return tuple(out)


_VIEWS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, InferenceLlama4]]" = weakref.WeakKeyDictionary()
_VIEWS_LOCK = threading.Lock()


def inference_view(model):
    """The model to run inference on: a prepared model or anything that is not a herd Llama4 (a
    mock in tests) as it is; for a trainable Llama4 on the CPU, its prepared copy
    (optimize_for_inference), kept while the model lives and rebuilt once its weights change
    (weights_version). The prepared form and its batch-1 step are built for CPU decode; a model on
    another device runs the general forward, as it is."""
    if isinstance(model, InferenceLlama4) or not isinstance(model, Llama4) or model.device.type != "cpu":
        return model
    version = weights_version(model)
    with _VIEWS_LOCK:
        hit = _VIEWS.get(model)
        if hit is not None and hit[0] == version:
            return hit[1]
        _VIEWS.pop(model, None)  # free a stale copy before building the next
    view = optimize_for_inference(model)
    with _VIEWS_LOCK:
        _VIEWS[model] = (version, view)
    return view
