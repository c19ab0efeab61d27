"""The decode step at batch 1: one token of one sequence through a model prepared for inference
(herd.inference.fast: bf16, or int8/int4 weights), with the per-token Python work hoisted.

    decoder = SingleDecoder.for_model(prepared)      # None where it does not apply (top-2 routing)
    logits = decoder(token, cache)                   # token [1, 1] → [1, vocab]

herd.Engine and herd.inference.Session build one for the model they run and hand it to
engine.forward_step, which uses it for one token of one row.

At batch 1 the step is bound by reading the weights (~246 MB of bf16 for the 123M-active benchmark
model; the products run on herd's native kernels where they load, herd.inference.native), and
everything else is overhead: ~120 small tensor ops per layer through nn.Module calls in the general
path. This step runs the same maths with about half the ops and no module calls:
  * everything that does not depend on the token is looked up once, when the step is built
    (kernels, norm weights, per-layer flags); the RoPE rotation and the NoPE temperature are
    computed once per token, not once per layer;
  * RMSNorm / QK-norm through `torch.rms_norm` (one dispatch, same float32 maths); q and k are
    rotated together (one 2×2 rotation per pair, built once per token) and QK-normed together;
  * the router's top-1 by argmax (no sort), then only the chosen expert's two matrices are read
    (a list of per-expert weights, indexed: no gather, no copy); the LM head is one product.
Roundings match the general path (same casts in the same places), so logits agree with it bit for
bit. Where herd's native ops load (herd.inference.native), the elementwise work between the
products runs on them instead — norm, RoPE + QK-norm + temperature, SwiGLU: one call each, ~25
fewer ops per layer, the same roundings but float32 sums in another order, so logits then agree to
rounding (SingleDecoder(model, native_glue=False) keeps the torch ops).

The cache protocol (begin / attend / end) is the same one the model uses: masks, chunk rings and
int8 keys/values all work unchanged.

`compile=True` (SingleDecoder(model, compile=True), herd.Engine(model, compile=True)) wraps the
per-layer maths around attention in `torch.compile` (inductor, C++ on CPU): fewer, fused kernels;
the first steps pay the compile time. Eager is the default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from herd.inference.fast import FastMoE, InferenceLlama4, KernelExperts
from herd.model.attention import temperature_scale
from herd.model.rope import rope_angles, text_inv_freq


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [H] as herd.model.llama4.RMSNorm computes it (float32, cast, × weight)."""
    return torch.rms_norm(x.float(), w.shape, eps=eps).type_as(x) * w


def _lin(p, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [in] times a weight → [out]: p is a kernel's matvec (herd.inference.fast / quant: the
    native bf16 / int8 kernels where they load, else torch.mv or torch's int8/int4 kernels)."""
    y = p(x)
    return y if bias is None else y + bias


def _kernel_arg(k):
    """What _lin takes for a FastLinear or a kernel: its one-row product, x [in] → [out]."""
    return getattr(k, "kernel", k).matvec


def attention_in(h, ln_w, eps: float, qkv, qkv_b, rot, scale, n_heads: int, n_kv: int, rope: bool, qk_norm: bool,
                 temp: bool):
    """h [H] → q [h, D], k [kv, D], v [kv, D], rotated / QK-normed / temperature-scaled as
    herd.model.attention.Attention.project does it."""
    D = rot.shape[0] * 2
    qkv = _lin(qkv, rms_norm(h, ln_w, eps), qkv_b)  # [(h + 2kv)·D], one product
    qk, v = qkv.view(n_heads + 2 * n_kv, D).split([n_heads + n_kv, n_kv])  # [h + kv, D], [kv, D]
    if rope:  # each interleaved pair (x0, x1) times its 2×2 rotation rot [D/2, 2, 2], in float32
        pairs = qk.float().view(n_heads + n_kv, D // 2, 1, 2)
        qk = (pairs * rot).sum(-1).flatten(-2).type_as(v)  # (x0·cos − x1·sin, x0·sin + x1·cos)
    if qk_norm:
        qk = torch.rms_norm(qk.float(), (D,), eps=eps).type_as(v)
    q, k = qk[:n_heads], qk[n_heads:]
    if temp:
        q = (q * scale).to(v.dtype)
    return q, k, v


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [2I] → silu(gate) · up [I], as herd.model.moe.SwiGLU computes it."""
    g, u = gate_up.chunk(2, dim=-1)
    return F.silu(g) * u


def attention_out(h, attn, o, o_b, ln_w, eps: float, router, norm=rms_norm):
    """Residual after attention and the FFN's input: h [H], attention output [h·D] →
    (h [H], x = norm(h) [H], router logits [E] or None)."""
    h = h + _lin(o, attn, o_b)
    x = norm(h, ln_w, eps)
    return h, x, (None if router is None else _lin(router, x))


def ffn(h, x, gate_up, down, e_gate_up=None, e_down=None, gate=None, swiglu=_swiglu):
    """h + shared expert / dense MLP of x [+ the routed expert of x · gate] → [H]."""
    y = _lin(down, swiglu(_lin(gate_up, x)))
    if e_gate_up is not None:
        y = y + _lin(e_down, swiglu(_lin(e_gate_up, x * gate)))
    return h + y


# ----- herd's native elementwise ops (herd.inference.native) in place of the torch ones --------------
# One call each for the norm, the RoPE/QK-norm/temperature of q and k, and SwiGLU's silu(g)·u, with
# the torch path's roundings at the same places: ~25 fewer torch ops per layer. float32 sums may
# differ from torch's in their last bit, so logits match the torch path to rounding, not bitwise.
def _norm_native(x, w, eps: float):
    return torch.ops.herd_native.rms_norm(x, w, eps)


def _swiglu_native(gate_up):
    return torch.ops.herd_native.swiglu(gate_up)


def attention_in_native(h, ln_w, eps: float, qkv, qkv_b, cos, sin, scale: float, n_heads: int, n_kv: int,
                        rope: bool, qk_norm: bool, temp: bool):
    """attention_in with cos/sin [D/2] (float32) instead of the 2×2 rotations, scale a float."""
    qkv = _lin(qkv, _norm_native(h, ln_w, eps), qkv_b)  # [(h + 2kv)·D]
    return torch.ops.herd_native.attention_prep(qkv, cos, sin, n_heads, n_kv, rope, qk_norm, eps, scale, temp)


def native_glue_available(dtype: torch.dtype) -> bool:
    """Can the step run its elementwise work on herd's native ops (loaded, float32/bf16 model)?"""
    from herd.inference import native

    return dtype in (torch.float32, torch.bfloat16) and native.available()


class SingleDecoder:
    """decoder(token [1, 1], cache) → logits [1, vocab] for a model prepared for inference."""

    @classmethod
    def applies(cls, model) -> bool:
        """The step runs prepared CPU models whose MoE layers route each token to one expert."""
        return (isinstance(model, InferenceLlama4) and model.device.type == "cpu"
                and all(ff.top_k == 1 for ff in model.moe_layers()))

    @classmethod
    def for_model(cls, model, compile: bool = False) -> "SingleDecoder | None":
        """The step for `model`, or None where it does not apply (the general forward runs)."""
        return cls(model, compile=compile) if cls.applies(model) else None

    def __init__(self, model, compile: bool = False, native_glue: bool | None = None):
        """native_glue: the elementwise work on herd's native ops (None: where they load)."""
        if not isinstance(model, InferenceLlama4):
            raise ValueError("the batch-1 step runs a model prepared for inference "
                             "(herd.inference.optimize_for_inference(model))")
        lm = model.language_model
        tc = model.config.text
        self.embed = lm.model.embed_tokens.weight
        self.norm_w, self.eps = lm.model.norm.weight, tc.rms_norm_eps
        self.lm_head = _kernel_arg(lm.lm_head)
        self.inv_freq = text_inv_freq(tc.head_dim, tc.rope_theta, tc.rope_scaling)  # [D/2] float32, as the model's
        self.n_heads, self.n_kv, self.head_dim = tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim
        self.temp = (tc.floor_scale, tc.attn_scale)
        self.native = native_glue_available(model.dtype) if native_glue is None else native_glue
        if self.native and not native_glue_available(model.dtype):
            raise ValueError("native_glue=True needs herd's native ops and a float32 or bf16 model")
        self.norm, swiglu = (_norm_native, _swiglu_native) if self.native else (rms_norm, _swiglu)
        self.layers = []
        for i, layer in enumerate(model.layers):
            a, ff = layer.self_attn, layer.feed_forward
            moe = ff if isinstance(ff, FastMoE) else None
            mlp = moe.shared_expert if moe is not None else ff
            experts = None
            if moe is not None:
                if moe.top_k != 1 or not isinstance(moe.experts, KernelExperts):
                    raise ValueError("the batch-1 step needs top-1 routing over per-expert kernels")
                ex = moe.experts
                # a list per layer, indexed by the chosen expert: only its weights are read
                experts = ([_kernel_arg(k) for k in ex.gate_up], [_kernel_arg(k) for k in ex.down])
            self.layers.append(dict(
                attn_in=dict(ln_w=layer.input_layernorm.weight, eps=layer.input_layernorm.eps,
                             qkv=_kernel_arg(a.qkv_proj), qkv_b=a.qkv_proj.bias, n_heads=a.n_heads, n_kv=a.n_kv,
                             rope=a.use_rope, qk_norm=a.qk_norm, temp=a.temperature_tuning),
                chunk=a.chunk,
                attn_out=dict(o=_kernel_arg(a.o_proj), o_b=a.o_proj.bias, ln_w=layer.post_attention_layernorm.weight,
                              eps=layer.post_attention_layernorm.eps, norm=self.norm,
                              router=None if moe is None else _kernel_arg(moe.router)),
                # cast once here, not per token (the router's logits come out in the model's dtype)
                bias=None if moe is None or not bool(moe.expert_bias.any()) else moe.expert_bias.to(self.embed.dtype),
                experts=experts,
                ffn=dict(gate_up=_kernel_arg(mlp.gate_up), down=_kernel_arg(mlp.down_proj), swiglu=swiglu)))
        fns = (attention_in_native if self.native else attention_in, attention_out, ffn)
        if compile:
            fns = tuple(torch.compile(f, dynamic=False) for f in fns)
        self._attention_in, self._attention_out, self._ffn = fns

    @torch.no_grad()
    def __call__(self, token: torch.Tensor, cache) -> torch.Tensor:
        positions = torch.tensor([cache.next_position])  # [1]
        cos, sin = rope_angles(positions, self.inv_freq)  # [1, D/2] float32: once per token, not per layer
        scale = temperature_scale(positions, *self.temp)[0]  # NoPE layers' query scale (float32)
        if self.native:
            angles = dict(cos=cos[0].contiguous(), sin=sin[0].contiguous(), scale=float(scale))
        else:
            c, s = cos[0], sin[0]
            rot = torch.stack((torch.stack((c, -s), -1), torch.stack((s, c), -1)), -2)  # [D/2, 2, 2]
            angles = dict(rot=rot, scale=scale)
        nh, nkv, D = self.n_heads, self.n_kv, self.head_dim
        h = self.embed[token.view(())]  # [H]
        cache.begin(positions)
        for i, L in enumerate(self.layers):
            q, k, v = self._attention_in(h, **angles, **L["attn_in"])
            out = cache.attend(i, q.view(1, nh, 1, D), k.view(1, nkv, 1, D), v.view(1, nkv, 1, D), positions,
                               chunk=L["chunk"])  # [1, h, 1, D]
            h, x, logits = self._attention_out(h, out.view(nh * D), **L["attn_out"])
            if logits is None:  # a dense MLP layer
                h = self._ffn(h, x, **L["ffn"])
                continue
            select = logits if L["bias"] is None else logits + L["bias"]
            e = int(select.argmax())  # top-1 (argmax = topk(1) without the sort)
            gate = torch.sigmoid(logits[e].float()).to(x.dtype)  # scales the expert input
            gu, dn = L["experts"]
            h = self._ffn(h, x, e_gate_up=gu[e], e_down=dn[e], gate=gate, **L["ffn"])
        cache.end()
        return _lin(self.lm_head, self.norm(h, self.norm_w, self.eps))[None]  # [1, vocab]
