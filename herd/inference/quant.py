"""Weight-only quantization (int8 per output channel, int4 grouped) of linear and expert weights.

    qmodel = quantize_model(model, bits=8)          # a new inference model; `model` is left as it was
    save_quantized(qmodel, "out_dir")                # safetensors + config.json "quantization_config"
    qmodel = load_quantized("out_dir")               # what `herd generate out_dir` and herd.load_model load
    qmodel = quantize_model(model, bits=8, activations="int8")   # decode also quantizes activations

What is quantized: every nn.Linear of the text decoder except the MoE routers (tiny, and routing
decisions should not move), the LM head, and the routed experts (each expert's [out, in] matrix
separately, per output channel). Embeddings, norms, the vision tower and the projector keep the
compute dtype. Activations stay in the compute dtype (bf16 or fp32) unless int8 activations are
asked for (Int8Kernel.set_activations; decode-sized products only). One row (decode at batch 1)
runs on herd's native kernels where they load (herd.inference.native: int8 rows against the
activations held as int16 per block of 64 — weight-only in effect — or, with int8 activations, as
int8 per block of 64 on VNNI, like llama.cpp's Q8_0); otherwise, and for a few rows, products
dequantize on the fly in torch's kernels (`aten._weight_int8pack_mm`, fbgemm's dynamic linear,
`_weight_int4pack_mm_for_cpu`), and for many rows (prefill, large batches) blocks of ~4 MiB of
dequantized rows, each used by one GEMM while in cache.

int8: w ≈ q · s, q ∈ [-127, 127], one scale per output channel.
int4: w ≈ (q − 8) · s + z per group of `group_size` inputs, q ∈ [0, 15] (the layout torch's CPU
int4 kernel takes); stored two per byte, low nibble first.

Measured on this project's 2-core machine (Xeon, AVX-512/AMX/VNNI, ~20–29 GB/s reads), decode at
batch 1 of a 123M-active model (benchmarks/decode.py, vs_llamacpp.py): torch's own weight-only int8
kernel widens every weight to float and is compute-bound (~10 GB/s of int8, slower per byte than
bf16), so int8 only pays with the native kernels (18–26 GB/s): then int8 decodes ~1.8× faster than
bf16 and 1.27× faster than llama.cpp's Q8_0 on the same machine. int4 stays on torch's kernel.

On disk (checkpoint layout of herd.save_model, plus):
  <linear>.qweight int8 [out, in] | uint8 [out, in/2]   <linear>.scales [out] | [out, in/g]
  <linear>.zeros [out, in/g] (int4)                    <linear>.bias (if any)
  <experts>.gate_up_qweight [E, 2I, H(/2)] …           <experts>.down_qweight [E, H, I(/2)] …
  <moe>.expert_bias [E] float32 (only where non-zero: the herd-only load-balancing bias, as save_model)
and config.json gets "quantization_config": {"quant_method": "herd", "bits", "group_size", "modules",
"activations" (null: weight-only; "int8": decode quantizes activations, see Int8Kernel)}.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import ModelConfig
from herd.inference.fast import FastLinear, InferenceLlama4, KernelExperts, inference_skeleton, install_kernels
from herd.model.moe import MoE, expert_biases
from herd.model.weights import atomic_write_bytes, quantization_config, read_safetensors, write_safetensors

QUANT_METHOD = "herd"
# Up to this many rows the fused int8/int4 kernels (their cost grows with the rows); above,
# blocks of dequantized weight and a GEMM.
SMALL_M = 16


# ----- kernels -------------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] → int8 q [out, in], float32 scales [out] (symmetric, per output channel)."""
    wf = w.float()
    s = wf.abs().amax(-1).clamp_min(1e-12) / 127.0
    return torch.round(wf / s[:, None]).clamp_(-127, 127).to(torch.int8), s


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] → q uint8 [out, in] in 0…15, scales and zeros float32 [out, in/group]
    with w ≈ (q − 8) · scale + zero (asymmetric per group)."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"int4 needs in_features ({K}) divisible by group_size ({group_size})")
    g = w.float().view(N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo).clamp_min(1e-8) / 15.0
    zero = lo + 8 * scale
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).view(N, K)
    return q, scale, zero


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K] values 0…15 → [..., K/2], element 2j in the low nibble."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack((p & 15, p >> 4), dim=-1).flatten(-2)


BLOCK_BYTES = 4 << 20  # dequantized weight rows per GEMM when many rows: ~4 MiB, stays in cache


def blocked_linear(x2: torch.Tensor, kernel) -> torch.Tensor:
    """x2 [M, in] @ W.T, W dequantized a block of output rows at a time: the int8/int4 weight is
    read once and each bf16 block is used while it is still in cache (never a full bf16 copy)."""
    N, K = kernel.out_features, kernel.in_features
    rows = max(256, BLOCK_BYTES // (2 * K))
    if rows >= N:
        return F.linear(x2, kernel.dequantize())
    y = x2.new_empty(x2.shape[0], N)
    for a in range(0, N, rows):
        b = min(N, a + rows)
        torch.matmul(x2, kernel.dequantize(a, b).t(), out=y[:, a:b])
    return y


def _vnni() -> bool:
    """Does this CPU have VNNI (int8 dot products without int16 saturation)?"""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


REDUCE_RANGE = not _vnni()  # 7-bit activations where u8×s8 pairs could saturate int16 (no VNNI)


def int8_activations_available() -> bool:
    """fbgemm's dynamic int8 linear (activations quantized per row on the fly) is in this torch."""
    return (hasattr(torch.ops.quantized, "linear_dynamic") and torch.backends.quantized.engine in ("x86", "fbgemm"))


class Int8Kernel:
    """y = x @ (q · s).T for int8 q [out, in] and scales [out] (in the compute dtype).

    One row (decode at batch 1) runs on herd's native kernels where they load
    (herd.inference.native, K % 64 == 0): weight-only, the activation row held as int16 per block
    of 64 values (finer than bf16 keeps it) against the int8 rows on VNNI (w8a16); with int8
    activations, the row quantized to int8 per block of 64 (w8a8, the scheme of llama.cpp's Q8_0,
    which uses blocks of 32). Both stream the int8 weight at 18–26 GB/s here where torch's kernels
    manage 8–13. Without them, one row and small batches (≤ SMALL_M rows) run on torch's
    `_weight_int8pack_mm` (weight-only) or fbgemm's dynamic int8 linear (int8 activations, per-row
    scales); int8 activations add ~0.5% error per product on well-behaved activations.
    """

    packed = None  # fbgemm-packed copy of the weight (int8 activations, batches), or None

    def __init__(self, q: torch.Tensor, s: torch.Tensor):
        self.q, self.s = q, s
        self.s32 = s.float()  # what the native kernels take
        self.out_features, self.in_features = q.shape
        from herd.inference import native

        self.native = native.supports(q)  # one row runs a native kernel
        self.matvec = self._matvec()

    def set_activations(self, int8: bool) -> None:
        self.packed = None
        if int8:
            import warnings

            with warnings.catch_warnings():  # quantized tensors are marked deprecated; the kernel is not
                warnings.simplefilter("ignore")
                qw = torch._make_per_channel_quantized_tensor(
                    self.q, self.s.double(), torch.zeros(self.out_features, dtype=torch.long), 0)
                self.packed = torch.ops.quantized.linear_prepack(qw, None)
        self.matvec = self._matvec()

    def _matvec(self):
        """x [in] → [out] for one row: a native kernel, else this kernel's general call."""
        from herd.inference import native

        if self.native:
            return functools.partial(native.op("w8a8_gemv" if self.packed is not None else "w8a16_gemv"),
                                     self.q, self.s32)
        return lambda x: self(x[None])[0]

    def dequantize(self, a: int = 0, b: int | None = None) -> torch.Tensor:
        """Output rows a … b-1 of the weight in the compute dtype."""
        return self.q[a:b].to(self.s.dtype) * self.s[a:b, None]

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 1 and self.native:
            y = self.matvec(x2[0])[None]
        elif x2.shape[0] <= SMALL_M and self.packed is not None:
            y = torch.ops.quantized.linear_dynamic(x2.float(), self.packed, REDUCE_RANGE).to(x.dtype)
        elif x2.shape[0] <= SMALL_M:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.q, self.s)
        else:
            y = blocked_linear(x2, self)
        if bias is not None:
            y = y + bias
        return y.view(*lead, self.out_features)


class Int4Kernel:
    """Grouped asymmetric int4 (see quantize_int4), via torch's CPU int4 kernel."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int):
        self.out_features = packed.shape[0]
        self.in_features = packed.shape[1] * 2
        self.group_size = group_size
        self.dtype = scales.dtype
        q = unpack_nibbles(packed).to(torch.int32)
        pad = -self.out_features % 16  # the kernel wants out_features divisible by 16
        if pad:
            q = F.pad(q, (0, 0, 0, pad), value=8)
            scales, zeros = F.pad(scales, (0, 0, 0, pad)), F.pad(zeros, (0, 0, 0, pad))
        self.w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        self.sz = torch.stack((scales.t(), zeros.t()), dim=-1).contiguous()  # [in/g, out, 2]
        self._packed, self._scales, self._zeros = packed, scales[:self.out_features], zeros[:self.out_features]

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """One row: x [in] → [out]."""
        return self(x[None])[0]

    def dequantize(self, a: int = 0, b: int | None = None) -> torch.Tensor:
        """Output rows a … b-1 of the weight in the compute dtype."""
        b = self.out_features if b is None else b
        K, g = self.in_features, self.group_size
        q = unpack_nibbles(self._packed[a:b]).to(self.dtype).view(b - a, K // g, g)
        return ((q - 8) * self._scales[a:b, :, None] + self._zeros[a:b, :, None]).view(b - a, K)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= SMALL_M:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.w, self.group_size, self.sz)
            if y.shape[-1] != self.out_features:
                y = y[:, :self.out_features]
        else:
            y = blocked_linear(x2, self)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, self.out_features)


def _kernel(q, scales, zeros, bits, group_size):
    return Int8Kernel(q, scales) if bits == 8 else Int4Kernel(q, scales, zeros, group_size)


def _quantize_tensor(w: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype):
    """w [..., out, in] → (q, scales, zeros | None) in the stored formats."""
    lead = w.shape[:-2]
    w2 = w.reshape(-1, *w.shape[-2:])
    qs, ss, zs = [], [], []
    for m in w2:
        if bits == 8:
            q, s = quantize_int8(m)
            qs.append(q), ss.append(s.to(dtype))
        else:
            q, s, z = quantize_int4(m, group_size)
            qs.append(pack_nibbles(q)), ss.append(s.to(dtype)), zs.append(z.to(dtype))
    stack = lambda ts: torch.stack(ts).view(*lead, *ts[0].shape)  # noqa: E731
    return stack(qs), stack(ss), (stack(zs) if zs else None)


# ----- modules -------------------------------------------------------------------------------------
class QuantLinear(FastLinear):
    """A Linear with int8 or int4 weights (buffers qweight, scales[, zeros], saved in the checkpoint)."""

    def __init__(self, qweight, scales, zeros=None, bias=None, bits: int = 8, group_size: int = 0):
        super().__init__(_kernel(qweight, scales, zeros, bits, group_size), bias)
        self.bits, self.group_size = bits, group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int = 64, dtype=None) -> "QuantLinear":
        dtype = dtype or linear.weight.dtype
        q, s, z = _quantize_tensor(linear.weight.detach(), bits, group_size, dtype)
        return cls(q, s, z, linear.bias, bits, group_size)

    def refresh(self) -> None:
        """Rebuild the kernel from the buffers (after load_state_dict(assign=True))."""
        self.kernel = _kernel(self.qweight, self.scales, self.zeros, self.bits, self.group_size)

    @classmethod
    def fuse(cls, mods: list["QuantLinear"]) -> "QuantLinear":
        """One QuantLinear for several of the same input (outputs concatenated; per-row scales stack)."""
        m0 = mods[0]
        if any((m.bits, m.group_size) != (m0.bits, m0.group_size) for m in mods):
            raise ValueError("cannot fuse QuantLinears of different formats")

        def cat(name):
            return None if getattr(m0, name) is None else torch.cat([getattr(m, name) for m in mods])

        return cls(cat("qweight"), cat("scales"), cat("zeros"), cat("bias"), m0.bits, m0.group_size)


class QuantExperts(KernelExperts):
    """Routed experts with int8/int4 weights, per expert and output channel."""

    def __init__(self, gate_up: tuple, down: tuple, bits: int = 8, group_size: int = 0):
        super().__init__(*self._kernels(gate_up, down, bits, group_size))
        self.bits, self.group_size = bits, group_size
        for prefix, (q, s, z) in (("gate_up", gate_up), ("down", down)):
            self.register_buffer(f"{prefix}_qweight", q)
            self.register_buffer(f"{prefix}_scales", s)
            self.register_buffer(f"{prefix}_zeros", z)

    @staticmethod
    def _kernels(gate_up, down, bits, group_size):
        def per_expert(q, s, z):
            return [_kernel(q[e], s[e], None if z is None else z[e], bits, group_size) for e in range(q.shape[0])]

        return per_expert(*gate_up), per_expert(*down)

    @classmethod
    def from_experts(cls, experts, bits: int = 8, group_size: int = 64, dtype=None) -> "QuantExperts":
        dtype = dtype or experts.gate_up_proj.dtype
        gu = _quantize_tensor(experts.gate_up_proj.detach().transpose(1, 2), bits, group_size, dtype)  # [E, 2I, H]
        dn = _quantize_tensor(experts.down_proj.detach().transpose(1, 2), bits, group_size, dtype)  # [E, H, I]
        return cls(gu, dn, bits, group_size)

    def refresh(self) -> None:
        self.gate_up, self.down = self._kernels(
            (self.gate_up_qweight, self.gate_up_scales, self.gate_up_zeros),
            (self.down_qweight, self.down_scales, self.down_zeros), self.bits, self.group_size)


# ----- whole models --------------------------------------------------------------------------------
def _targets(model):
    """(parent module, attribute name, module) for every quantizable Linear and Experts."""
    lm = model.language_model
    out = [(lm, "lm_head", lm.lm_head)]
    for layer in lm.model.layers:
        a = layer.self_attn
        out += [(a, n, getattr(a, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        ff = layer.feed_forward
        mlps = [ff.shared_expert] if isinstance(ff, MoE) else [ff]
        for mlp in mlps:
            out += [(mlp, n, getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")]
        if isinstance(ff, MoE):
            out.append((ff, "experts", ff.experts))
    return out


INT4_GROUPS = (32, 64, 128, 256)  # what torch's CPU int4 kernel accepts


def _check_bits(model, bits: int, group_size: int) -> None:
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if bits == 4:
        if group_size not in INT4_GROUPS:
            raise ValueError(f"int4 group_size must be one of {INT4_GROUPS}, got {group_size}")
        tc = model.config.text
        for name, k in (("hidden_size", tc.hidden_size), ("intermediate_size", tc.intermediate_size),
                        ("intermediate_size_mlp", tc.intermediate_size_mlp),
                        ("num_attention_heads × head_dim", tc.num_attention_heads * tc.head_dim)):
            if k % group_size:
                raise ValueError(f"int4 with group_size {group_size} needs {name} ({k}) divisible by it")


def set_int8_activations(model, on: bool = True):
    """Switch the int8 kernels of a quantized model to int8 activations at decode (see Int8Kernel)
    or back to weight-only; recorded in model.quantization_config["activations"]."""
    if on and not int8_activations_available():
        raise ValueError("int8 activations need torch's fbgemm dynamic linear (x86 CPU builds)")
    for m in model.modules():
        kernels = [m.kernel] if isinstance(m, QuantLinear) else (
            m.gate_up + m.down if isinstance(m, QuantExperts) else [])
        for k in kernels:
            if isinstance(k, Int8Kernel):
                k.set_activations(on)
    if getattr(model, "quantization_config", None) is not None:
        model.quantization_config["activations"] = "int8" if on else None
    return model


@torch.no_grad()
def quantize_model(model, bits: int = 8, group_size: int = 64, activations: str | None = None) -> InferenceLlama4:
    """A quantized inference model built from `model`'s weights (see the module docstring);
    `model` itself is left as it was. activations="int8" (bits 8 only): decode products quantize
    activations too (Int8Kernel)."""
    _check_bits(model, bits, group_size)
    if activations not in (None, "int8") or (activations and bits != 8):
        raise ValueError(f"activations must be None or 'int8' (with bits=8), got {activations!r}")
    if getattr(model, "quantization_config", None) is not None:
        raise ValueError(f"the model is already quantized ({model.quantization_config})")
    if isinstance(model, InferenceLlama4):
        raise ValueError("the model is already prepared for inference; quantize the model it was prepared from")
    dtype = model.dtype
    view = inference_skeleton(model)  # shares model's tensors; its modules are replaced, model's are not
    for parent, name, mod in _targets(view):
        if isinstance(mod, nn.Linear):
            new = QuantLinear.from_linear(mod, bits, group_size, dtype)
        else:
            new = QuantExperts.from_experts(mod, bits, group_size, dtype)
        setattr(parent, name, new)
    view.quantization_config = {"quant_method": QUANT_METHOD, "bits": bits,
                                "group_size": group_size if bits == 4 else None,
                                "modules": ["attention", "mlp", "experts", "lm_head"]}
    view = install_kernels(view)  # the remaining Linears (routers) and the MoE fast path
    return set_int8_activations(view) if activations else view


def _ckpt_key(name: str, multimodal: bool) -> str:
    return name if multimodal else name.removeprefix("language_model.")


def _unfused_state(model) -> dict[str, torch.Tensor]:
    """state_dict with the inference-time fusions (q|k|v, gate|up) split back into the checkpoint's
    separate projections, so a saved directory always has the standard layout."""
    out = {}
    for key, t in model.state_dict().items():
        if t is None:
            continue
        for fused, parts in ((".qkv_proj.", ("q_proj", "k_proj", "v_proj")), (".gate_up.", ("gate_proj", "up_proj"))):
            if fused in key:
                prefix, leaf = key.split(fused)
                owner = model.get_submodule(prefix)
                sizes = owner.qkv_sizes if fused == ".qkv_proj." else [t.shape[0] // 2] * 2
                for name, piece in zip(parts, t.split(sizes, dim=0)):
                    out[f"{prefix}.{name}.{leaf}"] = piece
                break
        else:
            out[key] = t
    return out


def save_quantized(model, out_dir) -> Path:
    """Write a quantized model: model.safetensors + config.json with its quantization_config."""
    qc = getattr(model, "quantization_config", None)
    if qc is None:
        raise ValueError("the model is not quantized (run quantize_model first)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {_ckpt_key(k, cfg.is_multimodal): v for k, v in _unfused_state(model).items() if v is not None}
    # the non-zero MoE load-balancing biases (non-persistent buffers, herd-only; herd/model/moe.py)
    state.update({_ckpt_key(k, cfg.is_multimodal): v for k, v in expert_biases(model).items()})
    write_safetensors(out / "model.safetensors", state, {"format": "pt", "quantization": json.dumps(qc)})
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    hf["quantization_config"] = qc
    atomic_write_bytes(out / "config.json", lambda f: f.write((json.dumps(hf, indent=2) + "\n").encode()))
    return out


def is_quantized_dir(path) -> bool:
    """Was the directory written by save_quantized (`herd quantize`)?"""
    return (quantization_config(path) or {}).get("quant_method") == QUANT_METHOD


def _empty_like_quant(mod, bits, group_size, dtype):
    """A QuantLinear/QuantExperts of the right shapes with empty buffers (filled by load)."""

    def bufs(lead, n, k):
        if bits == 8:
            return (torch.empty(*lead, n, k, dtype=torch.int8), torch.ones(*lead, n, dtype=dtype), None)
        g = k // group_size
        return (torch.zeros(*lead, n, k // 2, dtype=torch.uint8), torch.ones(*lead, n, g, dtype=dtype),
                torch.zeros(*lead, n, g, dtype=dtype))

    if isinstance(mod, nn.Linear):
        bias = None if mod.bias is None else torch.empty(mod.out_features, dtype=dtype)
        return QuantLinear(*bufs((), mod.out_features, mod.in_features), bias, bits, group_size)
    E, H, I2 = mod.gate_up_proj.shape
    return QuantExperts(bufs((E,), I2, H), bufs((E,), H, I2 // 2), bits, group_size)


def load_quantized(path, dtype: torch.dtype | None = None) -> InferenceLlama4:
    """Load a directory written by save_quantized (or `herd quantize`) → an inference-ready model."""
    d = Path(path)
    raw = json.loads((d / "config.json").read_text())
    qc = raw.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{d} is not a herd-quantized model (no quantization_config with quant_method 'herd')")
    bits, group_size = int(qc["bits"]), int(qc.get("group_size") or 0)
    config = ModelConfig.from_hf_dict(raw, name=str(d))
    stored = raw.get("torch_dtype") or (raw.get("text_config") or {}).get("torch_dtype") or "bfloat16"
    dtype = dtype or getattr(torch, stored)
    with torch.device("meta"):
        model = InferenceLlama4(config)
    for parent, name, mod in _targets(model):
        setattr(parent, name, _empty_like_quant(mod, bits, group_size, dtype))
    tensors = {}
    for f in sorted(d.glob("*.safetensors")):
        tensors.update(read_safetensors(f))
    mm = config.is_multimodal
    biases = {}  # optional herd-only `…feed_forward.expert_bias` [E]: zeros when absent
    for name, buf in model.named_buffers():
        if name.endswith(".expert_bias") and _ckpt_key(name, mm) in tensors:
            t = tensors.pop(_ckpt_key(name, mm))
            if tuple(t.shape) != tuple(buf.shape):
                raise ValueError(f"{d}: {name} has shape {tuple(t.shape)}, the config needs {tuple(buf.shape)}")
            biases[name] = t
    state = {}
    for k in model.state_dict():
        ck = _ckpt_key(k, mm)
        if ck in tensors:
            t = tensors.pop(ck)
            if k.endswith(("qweight", "scales", "zeros")):
                state[k] = t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t.clone()
                # a fresh, 64-byte aligned copy: the int8 kernel crashes on mmap offsets
            else:
                state[k] = t.to(dtype) if t.dtype != dtype else t
    expected = {k for k, v in model.state_dict().items() if v is not None}
    missing = sorted(expected - set(state))
    if missing or tensors:
        raise ValueError(f"{d}: quantized checkpoint does not match its config: missing {missing[:10]}, "
                         f"unexpected {sorted(tensors)[:10]}")
    model.load_state_dict(state, strict=False, assign=True)
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                module.register_buffer(name, torch.zeros(buf.shape, dtype=buf.dtype), persistent=False)
        if isinstance(module, (QuantLinear, QuantExperts)):
            module.refresh()
    for name, t in biases.items():  # before install_kernels: FastMoE checks once whether routing is plain
        model.get_submodule(name.removesuffix(".expert_bias")).expert_bias.copy_(t)
    model.quantization_config = qc
    model = install_kernels(model)
    return set_int8_activations(model) if qc.get("activations") == "int8" else model
