"""herd's native matrix-vector kernels (herd/inference/native) against float64 references.

The kernels are optional; on this project's machines (x86 with AVX-512, VNNI, BF16 and g++) they
must load, so a failure to build is a test failure here, not a skip. Elsewhere the tests that need
them skip with the reason the loader gives.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from herd.inference import native
from herd.inference.fast import DenseKernel
from herd.inference.native import autotune
from herd.inference.quant import Int8Kernel, quantize_int8

# HERD_NATIVE=0 (the user's switch to torch's kernels) turns the kernels off for the whole run,
# these tests included: they skip and say so, and the rest of the suite tests the torch paths
TURNED_OFF = os.environ.get("HERD_NATIVE", "1") == "0"
CAN_RUN = not TURNED_OFF and all(f in native._cpu_flags() for f in native.CPU_FLAGS)
needs_native = pytest.mark.skipif(not CAN_RUN, reason="turned off by HERD_NATIVE=0" if TURNED_OFF
                                  else "needs an x86 CPU with AVX-512 and VNNI")


@needs_native
def test_the_kernels_build_and_load_here():
    assert native.available(), native.why_unavailable()
    assert native.why_unavailable() is None


# every compiled variant of the products (rows × prefetch × thread split), then the setting in use
VARIANTS = [*autotune.VARIANTS, ()]
# two_threads (tests/conftest.py): the chunked thread splits only run with more than one thread


def _weights(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, s = quantize_int8(torch.randn(N, K, generator=g))
    return q, s, torch.randn(K, generator=g)


def _block_quantized(x: torch.Tensor, levels: int) -> torch.Tensor:
    """x [K] as the kernels see it, written independently of the C++: symmetric integers in
    [-levels, levels] per block of 64, xq = round-half-even(x · (levels / amax)) and d = amax / levels,
    both in float32 as the kernel computes them (so that values at a rounding boundary go the same
    way), then xq · d in float64."""
    xb = x.float().view(-1, native.BLOCK)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(float(levels)) / amax, torch.zeros(()))
    d = amax / levels
    return (torch.round(xb * inv).double() * d.double()).view(-1)


@needs_native
@pytest.mark.parametrize("N,K", [(1, 64), (37, 128), (1024, 1024), (515, 2048)])  # tails of 8/4/2 rows, chunks
def test_w8a16_is_the_product_with_16_bit_activations(N, K, two_threads):
    q, s, x = _weights(N, K)
    w = q.double() * s.double()[:, None]
    ref = w @ _block_quantized(x, 32767)
    exact = w @ x.double()  # and 16-bit activations are as good as exact at bf16 precision
    refb = w @ x.bfloat16().double()
    for tuning in VARIANTS:
        y = native.w8a16_gemv(q, s, x, tuning)
        assert y.dtype == torch.float32 and y.shape == (N,)
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-6, tuning
        assert ((y.double() - exact).abs().max() / exact.abs().max()).item() < 1e-4, tuning
        yb = native.w8a16_gemv(q, s, x.bfloat16(), tuning)  # bf16 activations: bf16 output
        assert yb.dtype == torch.bfloat16
        assert ((yb.double() - refb).abs() <= refb.abs() * 2 ** -8 + 1e-4 * refb.abs().max()).all(), tuning


@needs_native
@pytest.mark.parametrize("N,K", [(5, 64), (1024, 1024), (300, 2048)])
def test_w8a8_is_the_product_with_block_quantized_activations(N, K, two_threads):
    q, s, x = _weights(N, K, seed=1)
    x[:64] *= 50  # one block with large values: its scale must not leak into the others
    x[64:128] = 0  # an all-zero block (scale 0)
    ref = (q.double() * s.double()[:, None]) @ _block_quantized(x, 127)
    exact = (q.double() * s.double()[:, None]) @ x.double()
    for tuning in VARIANTS:
        y = native.w8a8_gemv(q, s, x, tuning)
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-6, tuning
        rel = ((y.double() - exact).norm() / exact.norm()).item()
        assert 1e-5 < rel < 0.02, (tuning, rel)  # really quantized, and close


@needs_native
@pytest.mark.parametrize("N,K", [(3, 64), (1024, 1024), (2051, 1024)])
def test_bf16_gemv_matches_float64(N, K, two_threads):
    if not native.bf16_available():
        pytest.skip("this CPU lacks AVX512-BF16")
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(N, K, generator=g).bfloat16(), torch.randn(K, generator=g).bfloat16()
    ref = w.double() @ x.double()
    mv = torch.mv(w, x).double()
    for tuning in VARIANTS:
        y = native.bf16_gemv(w, x, tuning)
        assert y.dtype == torch.bfloat16
        # the float32 sum rounded once to bf16: within half a bf16 ulp plus float32 summation error
        assert ((y.double() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-4).all(), tuning
        assert ((y.double() - mv).abs() <= ref.abs() * 2 ** -7 + 1e-3).all(), tuning


@needs_native
def test_all_variants_give_the_same_bits(two_threads):
    """Each row is summed by the same instructions in the same order whatever the setting, so the
    autotune's choice changes speed only, never a result."""
    q, s, x = _weights(1000, 1024, seed=8)
    w = (q.float() * s[:, None]).bfloat16()
    kernels = {"w8a16": lambda t: native.w8a16_gemv(q, s, x, t), "w8a8": lambda t: native.w8a8_gemv(q, s, x, t)}
    if native.bf16_available():
        kernels["bf16"] = lambda t: native.bf16_gemv(w, x.bfloat16(), t)
    for name, fn in kernels.items():
        want = fn(autotune.DEFAULT)
        for tuning in VARIANTS:
            assert torch.equal(fn(tuning), want), (name, tuning)


@needs_native
def test_a_setting_outside_the_compiled_variants_is_a_clear_error():
    q, s, x = _weights(8, 128)
    with pytest.raises(RuntimeError, match="rows must be 1, 2, 4 or 8"):
        native.w8a16_gemv(q, s, x, (3, 1, 0))
    with pytest.raises(RuntimeError, match="prefetch must be"):
        native.w8a8_gemv(q, s, x, (4, 3, 0))
    with pytest.raises(RuntimeError, match="chunk must be"):
        native.w8a8_gemv(q, s, x, (4, 1, 100))
    with pytest.raises(RuntimeError, match="kernel must be"):
        torch.ops.herd_native.set_gemv_tuning("fp8", [4, 1, 0])


@needs_native
def test_the_loaded_kernels_run_a_measured_or_cached_setting():
    t = native.tuning()
    assert t["source"] in ("tuned", "cache") or t["source"].startswith("default (HERD_NATIVE_AUTOTUNE=0)")
    assert set(t["settings"]) == ({"bf16", "w8a16", "w8a8"} if native.bf16_available() else {"w8a16", "w8a8"})
    assert all(tuple(v) in autotune.VARIANTS for v in t["settings"].values())


@needs_native
def test_autotune_measures_every_kernel_and_picks_a_compiled_variant():
    kernels = ("w8a16", "w8a8", "bf16") if native.bf16_available() else ("w8a16", "w8a8")
    before = torch.get_num_threads()
    try:
        for threads, n in [(2, 18), (1, 16)]:  # one thread: the thread splits are not measured
            torch.set_num_threads(threads)
            got = autotune.tune(kernels, pool_bytes=2 << 20, repeat=2, budget_s=60)
            assert got["complete"]
            for k in kernels:
                assert tuple(got["settings"][k]) in autotune.VARIANTS
                assert len(got["gbps"][k]) == n and all(v > 0 for v in got["gbps"][k].values())
                assert autotune.name(autotune.DEFAULT) in got["gbps"][k]
    finally:
        torch.set_num_threads(before)


@needs_native
def test_autotune_on_a_machine_too_busy_for_its_budget_keeps_the_default():
    """Past 3 × the budget no new variant is measured: here (budget 0) only the default, first."""
    got = autotune.tune(("w8a16", "w8a8"), pool_bytes=1 << 20, repeat=3, budget_s=0)
    assert got["complete"] is False
    for k in ("w8a16", "w8a8"):
        assert got["settings"][k] == list(autotune.DEFAULT)
        assert list(got["gbps"][k]) == [autotune.name(autotune.DEFAULT)]


def test_autotune_cache_is_written_reused_and_invalidated(tmp_path):
    path = tmp_path / autotune.FILE
    calls = []

    def fake(kernels, setting=(8, 2, 64)):
        calls.append(kernels)
        return {"settings": {k: list(setting) for k in kernels}, "gbps": {}, "seconds": 0.1}

    first = autotune.load_or_tune(path, "key-a", 2, ("w8a16", "w8a8"), run=fake)
    assert first["source"] == "tuned" and first["settings"]["w8a8"] == [8, 2, 64] and len(calls) == 1
    assert json.loads(path.read_text())["key"] == "key-a"
    again = autotune.load_or_tune(path, "key-a", 2, ("w8a16", "w8a8"), run=fake)  # reused, not measured
    assert again["source"] == "cache" and again["settings"] == first["settings"] and len(calls) == 1
    forced = autotune.load_or_tune(path, "key-a", 2, ("w8a16", "w8a8"), run=lambda k: fake(k, (2, 1, 256)),
                                   force=True)  # HERD_NATIVE_AUTOTUNE=retune: measured again, rewritten
    assert forced["source"] == "tuned" and len(calls) == 2
    assert autotune.load_or_tune(path, "key-a", 2, ("w8a16", "w8a8"), run=None)["settings"]["w8a8"] == [2, 1, 256]
    # another thread count is tuned and kept beside the first
    assert autotune.load_or_tune(path, "key-a", 1, ("w8a16", "w8a8"), run=fake)["source"] == "tuned"
    assert set(json.loads(path.read_text())["threads"]) == {"1", "2"}
    # a kernel the cache lacks (bf16 on a CPU that has it now) → tuned again
    assert autotune.load_or_tune(path, "key-a", 2, ("bf16", "w8a16"), run=fake)["source"] == "tuned"
    # another key (other CPU flags or another kernel source): tuned again, the old entries dropped
    other = autotune.load_or_tune(path, "key-b", 2, ("w8a16",), run=lambda k: fake(k, (2, 0, 0)))
    assert other["source"] == "tuned" and other["settings"]["w8a16"] == [2, 0, 0]
    data = json.loads(path.read_text())
    assert data["key"] == "key-b" and set(data["threads"]) == {"2"}
    assert len(calls) == 5


@pytest.mark.parametrize("text", ["{not json", "[]", '{"key": "key-a", "threads": {"2": {"settings": '
                                  '{"w8a16": [3, 1, 0]}}}}', '{"key": "key-a", "threads": 7}', ""])
def test_a_corrupted_autotune_cache_is_ignored_and_rewritten(tmp_path, text):
    path = tmp_path / autotune.FILE
    path.write_text(text)
    got = autotune.load_or_tune(path, "key-a", 2, ("w8a16",),
                                run=lambda k: {"settings": {"w8a16": [2, 4, 256]}, "gbps": {}, "seconds": 0})
    assert got["source"] == "tuned" and got["settings"]["w8a16"] == [2, 4, 256]
    assert autotune.load_or_tune(path, "key-a", 2, ("w8a16",), run=None)["source"] == "cache"


def test_autotune_key_follows_cpu_flags_and_source():
    flags = frozenset({"avx512f", "avx512_vnni"})
    key = autotune.cache_key(flags, b"kernel source")
    assert key == autotune.cache_key(frozenset(sorted(flags)), b"kernel source")
    assert key != autotune.cache_key(flags | {"avx512_bf16"}, b"kernel source")
    assert key != autotune.cache_key(flags, b"kernel source, edited")


def _own_cache(tmp_path):
    """A cache directory of the test's own holding a copy of the compiled library → its folder."""
    lib = native._build()
    mine = tmp_path / "native" / lib.parent.name / lib.name
    mine.parent.mkdir(parents=True)
    shutil.copy(lib, mine)
    return mine.parent


_SHOW = ("import torch; from herd.inference import native; t = native.tuning(); print(t['source']); "
         "print(sorted(set(map(tuple, t['settings'].values())))); q = torch.ones(64, 64, dtype=torch.int8); "
         "print(native.w8a16_gemv(q, torch.ones(64), torch.ones(64))[0].item())")


def _show(tmp_path, **env) -> list[str]:
    """A fresh process's tuning source, its settings, a product's value, with tmp_path as the cache."""
    base = {k: v for k, v in os.environ.items() if k != "HERD_NATIVE_AUTOTUNE"}
    return subprocess.run([sys.executable, "-c", _SHOW], capture_output=True, text=True, check=True,
                          env={**base, "HERD_CACHE": str(tmp_path), **env}).stdout.splitlines()


@needs_native
def test_autotune_off_runs_the_defaults_and_touches_no_cache(tmp_path):
    folder = _own_cache(tmp_path)
    assert _show(tmp_path, HERD_NATIVE_AUTOTUNE="0") == ["default (HERD_NATIVE_AUTOTUNE=0)", str([autotune.DEFAULT]),
                                                         "64.0"]
    assert not (folder / autotune.FILE).exists()


@needs_native
def test_first_load_tunes_and_writes_the_cache_the_next_load_reads_it(tmp_path):
    folder = _own_cache(tmp_path)
    first = _show(tmp_path)
    assert first[0] == "tuned" and first[2] == "64.0"
    data = json.loads((folder / autotune.FILE).read_text())
    assert data["key"] == autotune.cache_key(native._cpu_flags(), native.SOURCE.read_bytes()
                                             + Path(autotune.__file__).read_bytes())
    assert _show(tmp_path) == ["cache", *first[1:]]


@needs_native
def test_results_do_not_depend_on_the_thread_count():
    q, s, x = _weights(777, 1024, seed=3)
    w = (q.float() * s[:, None]).bfloat16()
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append((native.w8a16_gemv(q, s, x), native.w8a8_gemv(q, s, x),
                         native.bf16_gemv(w, x.bfloat16()) if native.bf16_available() else None))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert a is None or torch.equal(a, b)


@needs_native
def test_bad_input_is_a_clear_error():
    q, s, x = _weights(8, 128)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        native.w8a16_gemv(q[:, :96].contiguous(), s, x[:96])
    with pytest.raises(RuntimeError, match="x must be"):
        native.w8a8_gemv(q, s, x[:64])
    with pytest.raises(RuntimeError, match="float32"):
        native.w8a16_gemv(q, s.double(), x)
    with pytest.raises(RuntimeError, match="int8"):
        native.w8a16_gemv(q.float(), s, x)


@needs_native
@pytest.mark.parametrize("activations", [False, True])
def test_int8_kernel_uses_the_native_product_for_one_row(activations):
    q, s, x = _weights(256, 128, seed=4)
    k = Int8Kernel(q, s.bfloat16())
    k.set_activations(activations)
    assert k.matvec.func is native.op("w8a8_gemv" if activations else "w8a16_gemv")
    xb = x.bfloat16()
    one = k(xb[None])  # [1, 256] through __call__
    assert torch.equal(one[0], k.matvec(xb))
    ref = F.linear(xb.double()[None], k.dequantize().double())
    assert ((one.double() - ref).norm() / ref.norm()).item() < (0.02 if activations else 0.005)
    # several rows take torch's kernels; they agree with the one-row native product
    many = k(torch.stack([xb, xb, xb]))
    assert ((many[1].double() - one[0].double()).norm() / ref.norm()).item() < (0.02 if activations else 0.005)


@needs_native
def test_dense_kernel_one_row_and_fallbacks():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(96, 128, generator=g).bfloat16()
    k = DenseKernel(w, pack=False)
    assert k.matvec.func is (native.op("bf16_gemv") if native.bf16_available() else torch.mv)
    # float32 weights and widths that are not a multiple of 64 stay on torch.mv
    assert DenseKernel(w.float(), pack=False).matvec.func is torch.mv
    assert DenseKernel(w[:, :96].contiguous(), pack=False).matvec.func is torch.mv


def test_turned_off_by_environment():
    code = "from herd.inference import native; print(native.available(), native.why_unavailable())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HERD_NATIVE": "0"}).stdout
    assert out.strip() == "False turned off by HERD_NATIVE=0"


@needs_native
def test_a_broken_build_is_reported_not_raised(tmp_path):
    """A compiler that fails leaves the portable kernels in use and says why."""
    fake = tmp_path / "fake-g++"
    fake.write_text("#!/bin/sh\necho 'error: no such compiler' >&2\nexit 1\n")
    fake.chmod(0o755)
    code = "from herd.inference import native; print(native.available()); print(native.why_unavailable())"
    env = {**os.environ, "CXX": str(fake), "HERD_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.startswith("False\ncompiling gemv.cpp failed")
    assert "no such compiler" in out
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-written left behind


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,kv,S,D", [(4, 2, 1, 16), (8, 2, 37, 128), (10, 1, 300, 48), (16, 4, 1000, 64),
                                     (8, 1, 5000, 32)])  # the last: keys split across threads, merged
def test_decode_attention_matches_float64_softmax(dtype, h, kv, S, D):
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(6)
    cap = S + 5  # keys are a strided view of a cache with spare slots, as the KV cache passes them
    K, V = (torch.randn(kv, cap, D, generator=g) * 2).to(dtype), torch.randn(kv, cap, D, generator=g).to(dtype)
    q = (torch.randn(h, D, generator=g) * 2).to(dtype)
    k, v = K[:, :S], V[:, :S]
    out = native.op("decode_attention")(q, k, v, D ** -0.5)
    assert out.dtype == dtype and out.shape == (h, D)
    grp = h // kv
    scores = torch.einsum("jgd,jsd->jgs", q.double().view(kv, grp, D), k.double()) * D ** -0.5
    ref = torch.einsum("jgs,jsd->jgd", scores.softmax(-1), v.double()).reshape(h, D)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8 * ref.abs().max().item()
    assert (out.double() - ref).abs().max().item() < tol


@needs_native
def test_the_cache_decodes_one_row_through_native_attention():
    from herd.inference.cache import KVCache
    from tests.conftest import model_config

    cfg = model_config()
    assert KVCache(cfg, 1, 8)._native_decode is native.op("decode_attention")
    assert KVCache(cfg, 1, 8, dtype=torch.float16)._native_decode is None  # other dtypes: flash attention


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elementwise_ops_match_the_torch_step(dtype):
    """rms_norm / attention_prep / swiglu against the torch functions of herd.inference.single that
    they replace: the same roundings, so at most one unit in the last place apart (float32 sums may
    round differently), and in bf16 equal almost everywhere."""
    from herd.inference.single import attention_in, rms_norm

    assert native.available(), native.why_unavailable()
    ops = torch.ops.herd_native
    g = torch.Generator().manual_seed(7)

    def close(a, b):
        assert a.dtype == b.dtype and a.shape == b.shape
        ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -22
        assert ((a.float() - b.float()).abs() <= ulp * b.float().abs() + 1e-30).all()
        if dtype == torch.bfloat16:  # a float32 difference in the last bit rarely moves a bf16 rounding
            assert (a == b).float().mean().item() > 0.97

    x, w = torch.randn(200, generator=g).to(dtype) * 3, torch.randn(200, generator=g).to(dtype)
    close(ops.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5))

    h, kv, D = 4, 2, 16
    qkv = torch.randn((h + 2 * kv) * D, generator=g).to(dtype)
    ang = torch.rand(D // 2, generator=g) * 6
    cos, sin = ang.cos(), ang.sin()
    rot = torch.stack((torch.stack((cos, -sin), -1), torch.stack((sin, cos), -1)), -2)
    for rope, qk_norm, temp in [(True, True, False), (False, False, True), (True, False, True)]:
        # attention_in = norm, projection, then RoPE / QK-norm / temperature; with an identity
        # projection its q, k, v are attention_prep's of the normed input
        want = attention_in(qkv, torch.ones_like(qkv), 1e-5, lambda t: t, None, rot, torch.tensor(1.7), h, kv,
                            rope, qk_norm, temp)
        normed = rms_norm(qkv, torch.ones_like(qkv), 1e-5)
        got = ops.attention_prep(normed, cos, sin, h, kv, rope, qk_norm, 1e-5, 1.7, temp)
        for a, b in zip(got, want):
            close(a, b.reshape(a.shape))

    gu = torch.randn(256, generator=g).to(dtype) * 4
    gate, up = gu.chunk(2)
    close(ops.swiglu(gu), F.silu(gate) * up)
