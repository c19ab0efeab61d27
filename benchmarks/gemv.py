"""Matrix-vector products as decode at batch 1 runs them: herd's native kernels against torch's.

Decode at batch 1 streams every active weight from memory once per token, so a kernel's worth is
the rate at which it reads weights it has not seen recently. Each product here reads a 1 GiB
matrix ([N, 1024] rows, as in the benchmark model) that cannot sit in any cache, so the figure is
GB/s of weight streamed; the peers are torch's kernels for the same product, measured in turns in
the same run (median of --repeat turns). Also the single-query attention of the decode step
(herd's native kernel vs torch's flash attention for CPU) over a 512-token cache.

The yardstick (issue 19): the CPU model and the box's read bandwidth (a float32 sum over --bw-gib
GiB on the same threads, best of 5) are printed first, and every kernel's rate also as a fraction
of that bandwidth — the bound a matrix-vector product can reach — so a figure from one CPU kind
means something on another.

The autotune (herd/inference/native/autotune.py): the setting the kernels run with (cached, or
measured at load) is printed, then every compiled variant of each product (rows × prefetch ×
thread split, 48 per kernel) over a --variant-gib matrix, in turns, with its GB/s and fraction of
the read bandwidth — the full picture the autotune's short measurement samples. --no-variants skips it.

    python benchmarks/gemv.py
    python benchmarks/gemv.py --threads 1 --gib 0.5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import cpu_model, load_average, machine, markdown_table, read_bandwidth

from herd.inference import native
from herd.inference.native import autotune
from herd.model.attention import attention_lse


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gib", type=float, default=1.0, help="size of each weight matrix in GiB")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--bw-gib", type=float, default=1.0, help="GiB summed to measure the read bandwidth")
    ap.add_argument("--variant-gib", type=float, default=0.25, help="size of the weight each variant reads")
    ap.add_argument("--no-variants", action="store_true", help="skip the table of every tuning variant")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit(f"herd's native kernels are not available: {native.why_unavailable()}")
    print(f"# matrix-vector products, {args.gib} GiB weights — {machine()}; "
          f"load average {load_average().split()[0]}")
    bw = read_bandwidth(args.bw_gib, threads=args.threads)
    print(f"CPU: {cpu_model()}; read bandwidth {bw:.1f} GB/s ({args.threads} threads, float32 sum over "
          f"{args.bw_gib} GiB, best of 5)")
    K = 1024
    n8 = int(args.gib * 2**30) // K  # rows of an int8 matrix of that size
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (n8, K), dtype=torch.int8, generator=g)
    s = torch.rand(n8, generator=g) / 100
    s16 = s.bfloat16()
    w = torch.randn(n8 // 2, K, generator=g).bfloat16()  # the same bytes in bf16
    x = torch.randn(K, generator=g).bfloat16()
    cases = {  # name: (fn, bytes read, peer name)
        "torch.mv (bf16)": (lambda: torch.mv(w, x), w.numel() * 2, None),
        "herd native bf16": (lambda: native.bf16_gemv(w, x), w.numel() * 2, "torch.mv (bf16)"),
        "torch _weight_int8pack_mm (int8, weight-only)": (
            lambda: torch.ops.aten._weight_int8pack_mm(x[None], q, s16), q.numel(), None),
        "herd native w8a16 (int8, weight-only)": (
            lambda: native.w8a16_gemv(q, s, x), q.numel(), "torch _weight_int8pack_mm (int8, weight-only)"),
        "herd native w8a8 (int8, int8 activations)": (
            lambda: native.w8a8_gemv(q, s, x), q.numel(), "torch _weight_int8pack_mm (int8, weight-only)"),
    }
    if not native.bf16_available():
        del cases["herd native bf16"]
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for name, (fn, _, _) in cases.items():
        fn()  # warm-up
    for _ in range(args.repeat):  # turns: every kernel once per round
        for name, (fn, nbytes, _) in cases.items():
            rates[name].append(nbytes / timed(fn) / 1e9)
    rows = []
    for name, (_, _, peer) in cases.items():
        r = statistics.median(rates[name])
        rows.append([name, f"{r:.1f}", f"{r / bw:.0%}", f"{min(rates[name]):.1f}–{max(rates[name]):.1f}",
                     f"{r / statistics.median(rates[peer]):.2f}× {peer}" if peer else "peer"])
    print(markdown_table(["kernel", "GB/s (median)", "of read bandwidth", "range", "vs"], rows))

    # attention of one query position over a 512-token cache (the benchmark model's heads)
    h, kv, D, S = 8, 2, 128, 512
    caches = [(torch.randn(1, kv, S + 64, D, generator=g).bfloat16(), torch.randn(1, kv, S + 64, D, generator=g).bfloat16())
              for _ in range(64)]  # 64 layers' worth, so that most reads miss the caches
    qa = torch.randn(h, D, generator=g).bfloat16()
    op = native.op("decode_attention")
    att = {"torch flash attention (CPU)": lambda K, V: attention_lse(qa.view(1, h, 1, D), K[:, :, :S], V[:, :, :S]),
           "herd native decode attention": lambda K, V: op(qa, K[0, :, :S], V[0, :, :S], D ** -0.5)}
    us: dict[str, list[float]] = {name: [] for name in att}
    for _ in range(args.repeat):
        for name, fn in att.items():
            us[name].append(timed(lambda: [fn(K, V) for K, V in caches]) / len(caches) * 1e6)
    peer = statistics.median(us["torch flash attention (CPU)"])
    print()
    print(markdown_table(["single-query attention, 8 heads / 2 KV heads, 512 keys, bf16", "µs per call (median)", "vs"],
                         [[name, f"{statistics.median(v):.1f}", f"{peer / statistics.median(v):.2f}× faster"
                           if name.startswith("herd") else "peer"] for name, v in us.items()]))
    if not args.no_variants:
        print()
        variants(args, bw, g)
    print(f"\nload average at end {load_average().split()[0]}")


def variants(args, bw: float, g: torch.Generator) -> None:
    """The setting in use and every variant's rate, per kernel, the variants taking turns."""
    t = native.tuning()
    print(f"tuning in use ({t['source']}, {t['threads']} threads"
          + (f", measured in {t['seconds']} s" if "seconds" in t else "")
          + (", not every variant measured: the machine was busy" if t.get("complete") is False else "") + "): "
          + "; ".join(f"{k} {autotune.name(tuple(v))}" for k, v in t["settings"].items()))
    if t["threads"] != args.threads:
        print(f"(tuned for {t['threads']} threads, benchmarked on {args.threads})")
    K = 1024
    n8 = int(args.variant_gib * 2**30) // K
    q, s = torch.randint(-127, 128, (n8, K), dtype=torch.int8, generator=g), torch.rand(n8, generator=g) / 100
    w, x = torch.randn(n8 // 2, K, generator=g).bfloat16(), torch.randn(K, generator=g).bfloat16()
    kernels = {"w8a16": (lambda v: native.w8a16_gemv(q, s, x, v), q.numel()),
               "w8a8": (lambda v: native.w8a8_gemv(q, s, x, v), q.numel())}
    if native.bf16_available():
        kernels = {"bf16": (lambda v: native.bf16_gemv(w, x, v), w.numel() * 2), **kernels}
    rows = []
    for k, (fn, nbytes) in kernels.items():
        rates: dict = {v: [] for v in autotune.VARIANTS}
        for v in autotune.VARIANTS:
            fn(v)  # warm-up
        for _ in range(args.repeat):
            for v in autotune.VARIANTS:
                rates[v].append(nbytes / timed(lambda: fn(v)) / 1e9)
        med = {v: statistics.median(r) for v, r in rates.items()}
        chosen = tuple(t["settings"][k])
        for v in sorted(med, key=med.get, reverse=True):
            mark = " ← in use" if v == chosen else ""
            mark += " (default)" if v == autotune.DEFAULT else ""
            rows.append([k, autotune.name(v) + mark, f"{med[v]:.1f}", f"{med[v] / bw:.0%}",
                         f"{med[v] / med[autotune.DEFAULT]:.2f}×"])
    print(markdown_table([f"kernel ({args.variant_gib} GiB weight)", "variant", "GB/s (median)",
                          "of read bandwidth", "vs default"], rows))


if __name__ == "__main__":
    main()
