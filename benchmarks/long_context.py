"""Long context on the `tiny` preset: prefill and decode at 32k, 128k and 1M tokens.

Each length runs in a fresh process (so its peak RSS is its own): the prompt is prefilled in
segments of --prefill-chunk tokens through the KV cache, then --new tokens are decoded. Printed:
prefill tokens/s, decode tokens/s, KV bytes (global NoPE layers, chunked layers) and peak RSS.

Only the NoPE layers' cache grows with the context; each chunked layer keeps one chunk (256
positions in `tiny`). The cost that grows is attention in the NoPE layers: quadratic for prefill,
linear per decoded token. A length whose projected prefill time (extrapolated quadratically from
the previous length) exceeds --max-prefill-seconds is not prefilled: its global cache is filled
with random keys/values instead, so decode speed and memory at that length are still measured,
and the table says so ("synthetic").

    python benchmarks/long_context.py                         # 32k, 128k, 1M
    python benchmarks/long_context.py --lengths 4096 16384    # quick check
    python benchmarks/long_context.py --kv int8               # int8 keys/values in the NoPE layers
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import machine, markdown_table, setup_threads

SCOUT_GLOBAL_LAYERS, SCOUT_KV, SCOUT_D, SCOUT_CHUNK_LAYERS = 12, 8, 128, 36


def run_one(length: int, new: int, chunk: int, kv: str | None, synthetic: bool, dtype: str) -> dict:
    import herd
    from herd.inference.cache import KVCache
    from herd.inference.engine import forward_step
    from herd.inference.fast import optimize_for_inference

    setup_threads()
    dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    model = optimize_for_inference(herd.build_model("tiny", dtype=dt, seed=0).eval())
    V = model.config.text.vocab_size
    g = torch.Generator().manual_seed(0)
    cache = KVCache.for_model(model, 1, capacity=length + new + 1, kv_dtype=kv)
    out = {"length": length, "synthetic": synthetic}
    with torch.inference_mode():
        forward_step(model, torch.randint(0, V - 128, (1, 8), generator=g), cache)  # warm-up
        cache.reset()
        t = time.perf_counter()
        if synthetic:  # fill the cache as prefill would, without computing: random keys/values
            for i in range(cache.num_layers):
                n = length if cache.chunks[i] is None else (length - 1) % cache.chunks[i] + 1
                for buf in (cache.k[i], cache.v[i]):
                    if buf.dtype == torch.int8:
                        buf[0, :, :n].random_(-127, 128, generator=g)
                    else:
                        buf[0, :, :n].normal_(generator=g)
                for sc in (cache.k_scale[i], cache.v_scale[i]):
                    if sc is not None:
                        sc[0, :, :n] = 0.02
            cache.lengths[0] = length
            logits = forward_step(model, torch.randint(0, V - 128, (1, 1), generator=g), cache)
        else:
            for a in range(0, length, chunk):
                n = min(chunk, length - a)
                logits = forward_step(model, torch.randint(0, V - 128, (1, n), generator=g), cache)
        out["prefill_s"] = time.perf_counter() - t
        tok = logits.argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(new):
            tok = forward_step(model, tok, cache).argmax(-1, keepdim=True)
        out["decode_s"] = time.perf_counter() - t
    out["kv_global"] = cache.nbytes("global")
    out["kv_chunked"] = cache.nbytes("chunked")
    out["kv_global_used"] = sum(cache.k[i][0, :, :cache.lengths[0]].numel() * 2 * cache.k[i].element_size()
                                + (0 if cache.k_scale[i] is None else cache.lengths[0] * cache.kv_heads * 8)
                                for i in range(cache.num_layers) if cache.chunks[i] is None)
    out["max_chunk_slots"] = max(cache.slots(i) for i in range(cache.num_layers) if cache.chunks[i] is not None)
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="*", default=[32768, 131072, 1048576])
    ap.add_argument("--new", type=int, default=32, help="tokens decoded after the prompt")
    ap.add_argument("--prefill-chunk", type=int, default=4096)
    ap.add_argument("--kv", choices=("auto", "int8"), default="auto")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--max-prefill-seconds", type=float, default=1200.0)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--synthetic", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    kv = None if args.kv == "auto" else args.kv
    if args.one:
        print(json.dumps(run_one(args.one, args.new, args.prefill_chunk, kv, args.synthetic, args.dtype)))
        return
    setup_threads()
    print(f"# long-context benchmark, preset tiny, {args.dtype}, KV {args.kv} — {machine()}")
    rows, last = [], None  # last: the latest length that was really prefilled
    for L in args.lengths:
        synthetic = False
        if last is not None:
            projected = last["prefill_s"] * (L / last["length"]) ** 2
            synthetic = projected > args.max_prefill_seconds
            if synthetic:
                print(f"{L}: prefill would take ~{projected / 60:.0f} min (quadratic from {last['length']}); "
                      f"filling the cache with random keys/values instead", flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(L), "--new", str(args.new),
               "--prefill-chunk", str(args.prefill_chunk), "--kv", args.kv, "--dtype", args.dtype]
        if synthetic:
            cmd.append("--synthetic")
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{L}: failed:\n{res.stderr[-2000:]}")
            break
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(json.dumps(r), flush=True)
        rows.append([f"{L:,}", "synthetic fill" if r["synthetic"] else f"{L / r['prefill_s']:.0f}",
                     "–" if r["synthetic"] else f"{r['prefill_s']:.0f}", f"{args.new / r['decode_s']:.1f}",
                     gib(r["kv_global_used"]), gib(r["kv_chunked"]), r["max_chunk_slots"], gib(r["peak_rss"])])
        if not r["synthetic"]:
            last = r
    print()
    print(markdown_table(["context", "prefill tok/s", "prefill s", "decode tok/s", "KV global (NoPE) layers",
                          "KV chunked layers", "chunked slots/layer", "peak RSS"], rows))
    per_tok = SCOUT_GLOBAL_LAYERS * 2 * SCOUT_KV * SCOUT_D
    print(f"\nFor comparison, Scout's KV at 1M tokens: NoPE layers {gib(per_tok * 2 * 2**20)} in bf16, "
          f"{gib(per_tok * (1 + 4 / SCOUT_D) * 2**20)} in int8 (+ scales); chunked layers "
          f"{gib(SCOUT_CHUNK_LAYERS * 2 * SCOUT_KV * SCOUT_D * 2 * 8192)} (one 8192-token chunk each).")


if __name__ == "__main__":
    main()
