"""herd's optional native CPU kernels for decode at batch 1 (gemv.cpp): bf16 and int8 matrix-vector
products, single-query attention over the KV cache, and the step's elementwise work (RMSNorm,
RoPE + QK-norm + temperature, SwiGLU) in one call each.

Everything in herd runs without them; where they load, decode streams weights at close to memory
bandwidth (int8 instead of through torch's compute-bound int8 kernel; bf16 ~20% faster than
torch.mv) and spends less time between the products (see gemv.cpp for the maths).

    from herd.inference import native
    if native.available():
        y = native.w8a16_gemv(q, s, x)   # int8 q [N, K], float32 s [N], x [K] → [N] (x's dtype)
        y = native.w8a8_gemv(q, s, x)    # the same with x quantized to int8 per block of 64
        y = native.bf16_gemv(w, x)       # bf16 w [N, K] (where the CPU has AVX512-BF16)
    else:
        print(native.why_unavailable())

The C++ source is compiled on first use with the system's g++ (about 30 s) into
~/.cache/herd/native/<hash of source, flags and torch version>/ (or $HERD_CACHE/native/…) and
loaded into torch (torch.ops.herd_native). The build is written to a temporary name and renamed,
so concurrent processes never load a half-written library. It needs an x86 CPU with AVX-512 (F, BW,
VL) and VNNI, and a C++ compiler; HERD_NATIVE=0 turns it off (the portable torch kernels are used).

On first load the products' rows / prefetch / thread-split setting is measured on this CPU (about
1 s, native/autotune.py) and cached in autotune.json beside the library; `native.tuning()` says
what was chosen and where it came from; HERD_NATIVE_AUTOTUNE=0 keeps the defaults, =retune
measures again (on an idle machine: timings taken under load choose badly).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from herd.inference.native import autotune

SOURCE = Path(__file__).with_name("gemv.cpp")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
COMPILE_FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp",
                 "-ffp-contract=off",  # a·b − c·d stays two roundings, as torch computes it
                 "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma"]
BLOCK = 64  # K must be a multiple of this (one register of int8)


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _cache_dir() -> Path:
    root = os.environ.get("HERD_CACHE") or Path.home() / ".cache" / "herd"
    return Path(root) / "native"


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _compile_command(out: Path) -> list[str]:
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    return ([_compiler(), *COMPILE_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes,
             str(SOURCE), "-o", str(out), f"-L{libdir}", f"-Wl,-rpath,{libdir}", "-lc10", "-ltorch_cpu"])


def _build() -> Path:
    """Compile gemv.cpp (once per source, flags and torch version) → the shared library's path."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(COMPILE_FLAGS).encode()
                         + torch.__version__.encode()).hexdigest()[:16]
    lib = _cache_dir() / key / "herd_native.so"
    if lib.is_file():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    print(f"herd: compiling the native CPU kernels into {lib.parent} (once, ~30 s)", file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        done = subprocess.run(_compile_command(Path(tmp)), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, lib)  # atomic: another process sees the old state or the whole library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def _load() -> tuple[bool, str | None, dict | None]:
    """(loaded, why not, the products' tuning) — tried once per process."""
    if os.environ.get("HERD_NATIVE", "1") == "0":
        return False, "turned off by HERD_NATIVE=0", None
    missing = [f for f in CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return False, f"this CPU lacks {', '.join(missing)}", None
    if shutil.which(_compiler()) is None:
        return False, "no C++ compiler (g++) on PATH", None
    try:
        lib = _build()
        torch.ops.load_library(str(lib))
    except (RuntimeError, OSError) as e:
        return False, str(e), None
    _register_fakes()
    return True, None, _tune(lib.parent)


def _tune(where: Path) -> dict:
    """The products' settings for this CPU (native/autotune.py), applied to the loaded kernels."""
    kernels = tuple(k for k in autotune.KERNELS if k != "bf16" or "avx512_bf16" in _cpu_flags())
    mode = os.environ.get("HERD_NATIVE_AUTOTUNE", "1")
    if mode == "0":
        return autotune.defaults(kernels, "default (HERD_NATIVE_AUTOTUNE=0)")
    # keyed by the kernels' source and the tuner's own: a change to either measures again
    key = autotune.cache_key(_cpu_flags(), SOURCE.read_bytes() + Path(autotune.__file__).read_bytes())
    try:
        found = autotune.load_or_tune(where / autotune.FILE, key, torch.get_num_threads(), kernels,
                                      force=mode == "retune")
        autotune.apply(found["settings"])
    except RuntimeError as e:  # the kernels loaded but would not run: they keep their defaults
        return autotune.defaults(kernels, f"default (the autotune failed: {str(e).splitlines()[0]})")
    return found


def _register_fakes() -> None:
    """Output shapes of the ops for fake tensors, so that torch.compile can trace calls to them."""
    lib = "herd_native::"
    torch.library.register_fake(lib + "bf16_gemv")(lambda w, x, tuning=(): x.new_empty(w.shape[0]))
    torch.library.register_fake(lib + "w8a16_gemv")(lambda q, s, x, tuning=(): x.new_empty(q.shape[0]))
    torch.library.register_fake(lib + "w8a8_gemv")(lambda q, s, x, tuning=(): x.new_empty(q.shape[0]))
    torch.library.register_fake(lib + "decode_attention")(lambda q, k, v, scale: torch.empty_like(q))
    torch.library.register_fake(lib + "rms_norm")(lambda x, w, eps: torch.empty_like(x))
    torch.library.register_fake(lib + "swiglu")(lambda gu: gu.new_empty(gu.shape[0] // 2))

    def prep(qkv, cos, sin, h, kv, rope, qk_norm, eps, scale, temp):
        D = qkv.shape[0] // (h + 2 * kv)
        return qkv.new_empty(h, D), qkv.new_empty(kv, D), qkv.new_empty(kv, D)

    torch.library.register_fake(lib + "attention_prep")(prep)


def available() -> bool:
    """True when the native kernels are compiled and loaded (compiles them on the first call)."""
    return _load()[0]


def why_unavailable() -> str | None:
    """None when available(), else the reason, for messages and benchmark reports."""
    return _load()[1]


def tuning() -> dict | None:
    """The products' settings in use (None when the kernels are not available): {"settings": {kernel:
    [rows, prefetch, chunk]}, "source": "cache" | "tuned" | "default (…)", "threads": n, and where
    measured "gbps": {kernel: {variant: GB/s}}} (see native/autotune.py)."""
    return _load()[2]


def available_for(dtype: torch.dtype) -> bool:
    """Are the kernels for data of this dtype usable here? bf16 arithmetic (bf16_gemv, bf16
    attention) also needs AVX512-BF16; float32 and int8 need only the kernels loaded."""
    return bf16_available() if dtype == torch.bfloat16 else available()


def supports(w: torch.Tensor) -> bool:
    """Can a native matrix-vector product take this weight [N, K]: int8 (w8a16 / w8a8) or bf16
    (bf16_gemv), on the CPU, K % 64 == 0, with the kernels usable here?"""
    return (w.dim() == 2 and w.device.type == "cpu" and w.shape[1] % BLOCK == 0
            and w.dtype in (torch.int8, torch.bfloat16) and available_for(w.dtype))


def op(name: str):
    """The loaded kernel `name` (bf16_gemv, w8a16_gemv, w8a8_gemv, decode_attention, rms_norm,
    attention_prep, swiglu) as a torch op, for binding into a hot loop; raises RuntimeError with the
    reason when the kernels are not available."""
    if not available():
        raise RuntimeError(f"herd's native kernels are not available: {why_unavailable()}")
    return getattr(torch.ops.herd_native, name)


def w8a16_gemv(q: torch.Tensor, s: torch.Tensor, x: torch.Tensor, tuning: tuple[int, int, int] = ()) -> torch.Tensor:
    """int8 q [N, K] · float32 scales s [N] times x [K] (float32/bf16) → y [N] in x's dtype;
    x taken as int16 per block of 64 values (see gemv.cpp), float32 sums. tuning (rows, prefetch,
    chunk) runs one variant (autotune.VARIANTS); () the setting in use."""
    return op("w8a16_gemv")(q, s, x, list(tuning))


def w8a8_gemv(q: torch.Tensor, s: torch.Tensor, x: torch.Tensor, tuning: tuple[int, int, int] = ()) -> torch.Tensor:
    """As w8a16_gemv with x quantized to int8 per block of 64 values (symmetric, round to nearest)."""
    return op("w8a8_gemv")(q, s, x, list(tuning))


def bf16_available() -> bool:
    """The bf16 kernel also needs AVX512-BF16 (vdpbf16ps)."""
    return available() and "avx512_bf16" in _cpu_flags()


def bf16_gemv(w: torch.Tensor, x: torch.Tensor, tuning: tuple[int, int, int] = ()) -> torch.Tensor:
    """bf16 w [N, K] times bf16 x [K] → bf16 y [N], float32 accumulation (K % 64 == 0); tuning as
    for w8a16_gemv."""
    if not bf16_available():
        raise RuntimeError("the native bf16 kernel needs AVX512-BF16 and the native kernels loaded")
    return op("bf16_gemv")(w, x, list(tuning))
