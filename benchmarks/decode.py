"""Prefill and decode throughput of herd's inference engine against transformers, same weights.

The model is the random 552M-total / 123M-active Llama 4 that llama.cpp was measured on (FACTS):
hidden 1024, 8 layers, 8 heads / 2 KV heads, head_dim 128, 16 experts top-1 + shared expert
(expert width 1024), vocab 50,257. It is built from random weights; transformers loads the same
weights from a directory herd writes.

Measured (best of --repeat where repeated):
  * prefill of a 512-token prompt at batch 1 (tokens/s, best of --repeat);
  * decode of 128 tokens at batch 1 through herd.Engine (greedy sampling included), in bf16 and
    with weight-only int8 (and int4 with --int4): 1 ÷ the median step time, the variants taking
    turns for --rounds rounds and the median round reported (the machine's speed drifts);
  * batched decode throughput at batch 8 and 32, prompts of --batch-prompt tokens (rows ÷ median
    step time while the batch is full);
  * transformers (bf16, same weights) prefill and decode at batch 1 (a greedy loop over its KV
    cache), printed as herd ÷ transformers.
Medians, not means: on a shared machine other processes stall some steps.
llama.cpp's figures from FACTS (same model, 2 threads, another machine: AMD EPYC) are printed as the
targets; benchmarks/vs_llamacpp.py (run by scripts/llamacpp_side_by_side.sh) measures llama.cpp on
this machine, alternating with herd round by round.

    python benchmarks/decode.py                 # full run (~3-5 min on 2 cores)
    python benchmarks/decode.py --quick         # a small model and short runs: checks the script works
    python benchmarks/decode.py --int4 --kv int8 --no-transformers
    python benchmarks/decode.py --int4 --int8-act --compile   # + int8 activations, + the compiled step
    python benchmarks/decode.py --profile       # only: a per-op profile of one bf16 batch-1 decode step

The yardstick (issue 19): the native kernels' per-CPU setting (herd/inference/native/autotune.py),
the CPU model and the box's read bandwidth (float32 sum over 1 GiB, the
benchmark's threads, best of 5) are printed first; each batch-1 decode rate is also given as the
weight stream it implies — tok/s × the weight bytes one token reads (the active weights without
the embedding table, of which one row is read: bf16 2 bytes, int8 1 + its per-row scale, int4
½ + a scale and a zero per group of 64) — and that stream as a fraction of the read bandwidth,
the bound batch-1 decode can reach. --profile prints torch.profiler's top ops by self CPU time
over one bf16 batch-1 step (averaged over --profile-steps steps), with the share spent in the
matrix-vector products and the share outside them.

Batch-1 decode runs herd.inference.single (the hoisted one-token step); the row "(general path)"
is the same model through the general forward, measured in the same run. The row "as loaded via
the public API" is what README's Use section does: herd.load_model(dir) of the same weights (a
trainable model), then herd.generate_stream — herd prepares the model by itself; 1 ÷ the median
time between its tokens, taking turns with the fast-path rows. It should match "herd bf16".
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time

import torch
from common import (cpu_model, load_average, machine, markdown_table, quiet_transformers, read_bandwidth,
                    setup_threads)

import herd
from herd.config import ModelConfig, TextConfig
from herd.inference import Engine, SamplingParams
from herd.inference.cache import KVCache
from herd.inference.engine import forward_step
from herd.inference.fast import optimize_for_inference
from herd.inference.quant import quantize_model

PUBLIC = "bf16, as loaded via the public API"

LLAMA_CPP = {"prefill": "1015–1222", "bf16": "117–137", "int8": "160–170 (Q8_0)", "fp32": "54–65"}


def model_config(quick: bool) -> ModelConfig:
    if quick:
        tc = TextConfig(vocab_size=8192, hidden_size=256, intermediate_size=256, intermediate_size_mlp=512,
                        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                        num_local_experts=16, num_experts_per_tok=1, bos_token_id=0, eos_token_id=1)
    else:
        tc = TextConfig(vocab_size=50257, hidden_size=1024, intermediate_size=1024, intermediate_size_mlp=2048,
                        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                        num_local_experts=16, num_experts_per_tok=1, bos_token_id=0, eos_token_id=1)
    return ModelConfig(text=tc)


def herd_prefill(model, ids: torch.Tensor, repeat: int, chunk: int | None) -> float:
    """tokens/s of prefilling ids [1, T] into a fresh cache (logits of the last position)."""
    T = ids.shape[1]
    step = chunk or T
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeat + 1):  # the first run warms up
            cache = KVCache.for_model(model, 1, T + 8)
            t = time.perf_counter()
            for a in range(0, T, step):
                forward_step(model, ids[:, a:a + step], cache.select(0, 1))
            best = min(best, time.perf_counter() - t)
    return T / best


def bytes_per_token(cfg: ModelConfig, bits: int | None, group_size: int = 64) -> float:
    """Weight bytes one batch-1 decode step reads: the active weights without the embedding table
    (one of its rows is read) at `bits` (None: bf16) — int8 adds a bf16 scale per output row,
    int4 a bf16 scale and zero per group."""
    tc = cfg.text
    active = herd.count_params(cfg)["active"] - tc.vocab_size * tc.hidden_size
    if bits is None:
        return active * 2.0
    if bits == 8:
        return active * (1 + 2 / tc.hidden_size)  # one scale per row of ~hidden_size inputs
    return active * (0.5 + 4 / group_size)


# names of the ops that are the matrix-vector (or matrix) products of a step, for --profile
PRODUCT_OPS = ("gemv", "aten::mv", "aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm",
               "_weight_int8pack_mm", "_weight_int4pack_mm", "linear_dynamic")


def profile_step(model, prompt: list[int], steps: int, kv=None, rows: int = 25) -> None:
    """Print torch.profiler's per-op table (self CPU time) over `steps` batch-1 decode steps of
    herd.Engine (greedy, as herd_decode), and how the time splits between products and the rest."""
    from torch.profiler import ProfilerActivity, profile

    engine = Engine(model, max_batch=1, capacity=len(prompt) + steps + 16, prefill_chunk=512, kv_dtype=kv)
    engine.add(prompt, SamplingParams(max_new_tokens=steps + 8, stop_token_ids=[]))
    while engine.prefilling is not None or engine.waiting or not engine.active:
        engine.step()  # prefill (and the first token)
    for _ in range(5):
        engine.step()  # warm-up decode steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = (time.perf_counter() - t) * 1e6  # µs
    events = prof.key_averages()
    # self CPU time: the op's own wall time on the calling thread (its intra-op threads included),
    # without its children; the rest of the step's wall time is Python and the engine outside ops
    in_ops = sum(e.self_cpu_time_total for e in events)
    products = sum(e.self_cpu_time_total for e in events if any(p in e.key for p in PRODUCT_OPS))
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))
    print(f"per step: {wall / steps / 1e3:.2f} ms wall (profiler on: slower than unprofiled) = matrix products "
          f"{products / wall:.0%} + other ops {(in_ops - products) / wall:.0%} + outside ops (Python, engine, "
          f"profiler) {max(0.0, 1 - in_ops / wall):.0%}")
    # op calls per step (nested ones included), which unlike the times above do not depend on how
    # busy the machine is
    n_products = sum(e.count for e in events if any(p in e.key for p in PRODUCT_OPS)) / steps
    n_all = sum(e.count for e in events) / steps
    print(f"op calls per step: {n_all:.0f} in all, of which {n_products:.0f} matrix products; the most frequent "
          "others: " + ", ".join(f"{e.key} {e.count / steps:.0f}" for e in sorted(
              (e for e in events if not any(p in e.key for p in PRODUCT_OPS)), key=lambda e: -e.count)[:8]))


def native_line() -> str:
    """Which products the step runs: herd's native kernels with their per-CPU setting, or torch's."""
    from herd.inference import native
    from herd.inference.native import autotune

    if not native.available():
        return f"native kernels: not available ({native.why_unavailable()}): torch's kernels"
    t = native.tuning()
    return (f"native kernels: setting {t['source']} for {t['threads']} threads — "
            + "; ".join(f"{k} {autotune.name(tuple(v))}" for k, v in t["settings"].items()))


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def general_path(model, prompts, new, kv=None) -> float:
    """herd_decode at batch 1 with the batch-1 step switched off (the general forward)."""
    return herd_decode(model, prompts, new, kv, single_step=False)


def public_decode(model, prompt: list[int], new: int, kv=None) -> float:
    """Decode tokens/s at batch 1 the way a user runs it: herd.generate_stream on the model as
    herd.load_model returned it (greedy) — 1 ÷ the median time between consecutive tokens."""
    times, last = [], None
    for _ in herd.generate_stream(model, [prompt], max_new_tokens=new, stop_token_ids=[], kv_dtype=kv):
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
    return 1 / median(times)


def herd_decode(model, prompts: list[list[int]], new: int, kv=None, stat: str = "median", single_step: bool = True,
                compile: bool = False) -> float:
    """Decode tokens/s with all len(prompts) rows running (herd.Engine, greedy sampling included):
    rows ÷ the median time of the steps taken while every row is decoding (stat="mean": rows × steps
    ÷ their total time, llama-bench's definition)."""
    B = len(prompts)
    engine = Engine(model, max_batch=B, capacity=max(map(len, prompts)) + new + 1, prefill_chunk=512, kv_dtype=kv,
                    single_step=single_step, compile=compile)
    params = SamplingParams(max_new_tokens=new, stop_token_ids=[])
    for p in prompts:
        engine.add(p, params)
    times = []
    while engine.has_work():
        full = len(engine.active) == B and engine.prefilling is None and not engine.waiting
        t = time.perf_counter()
        engine.step()
        if full and len(engine.active) == B:
            times.append(time.perf_counter() - t)
    return B / median(times) if stat == "median" else B * len(times) / sum(times)


def hf_numbers(model, ids: torch.Tensor, new: int, repeat: int) -> tuple[float, float]:
    """transformers (bf16, same weights): prefill tok/s (best of `repeat`) and decode tok/s at batch 1
    (1 ÷ median step time of a greedy loop over its own KV cache, as `generate` runs it)."""
    transformers = quiet_transformers()
    with tempfile.TemporaryDirectory() as d:
        herd.save_model(model, d)
        hf = transformers.Llama4ForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    T = ids.shape[1]
    with torch.inference_mode():
        hf(ids[:, :16])  # warm-up
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            out = hf(ids, use_cache=True, logits_to_keep=1)
            best = min(best, time.perf_counter() - t)
        past, tok, times = out.past_key_values, out.logits[:, -1:].argmax(-1), []
        for i in range(new - 1):
            t = time.perf_counter()
            out = hf(input_ids=tok, past_key_values=past, use_cache=True,
                     cache_position=torch.tensor([T + i]), logits_to_keep=1)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t)
    del hf
    gc.collect()
    return T / best, 1 / median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model, short runs (checks the script)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--batch-prompt", type=int, default=128, help="prompt length of the batched runs")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of batch-1 decode, variants taking turns")
    ap.add_argument("--int4", action="store_true", help="also measure int4 weights (group 64)")
    ap.add_argument("--kv", choices=("auto", "int8"), default="auto", help="KV cache of the global layers")
    ap.add_argument("--int8-act", action="store_true",
                    help="also int8 weights with int8 activations (native w8a8 at batch 1, fbgemm for batches)")
    ap.add_argument("--compile", action="store_true", help="also bf16 with the torch.compile'd batch-1 step")
    ap.add_argument("--no-general", action="store_true", help="skip the general-path rows at batch 1")
    ap.add_argument("--no-public", action="store_true",
                    help="skip the row of the model as herd.load_model returns it, run by herd.generate_stream")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="only print a per-op profile of one bf16 batch-1 decode step (torch.profiler)")
    ap.add_argument("--profile-steps", type=int, default=20, help="decode steps averaged by --profile")
    args = ap.parse_args()
    if args.quick:
        args.prompt, args.new, args.batches, args.repeat, args.batch_prompt, args.rounds = 64, 16, [4], 1, 32, 1
    setup_threads()
    kv = None if args.kv == "auto" else args.kv
    print(f"# decode benchmark — {machine()}; load average at start {load_average().split()[0]}")
    cfg = model_config(args.quick)
    print(native_line())
    if args.profile:
        model = optimize_for_inference(herd.build_model(cfg, dtype=torch.bfloat16, seed=0).eval())
        prompt = torch.randint(2, cfg.text.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0))
        print(f"CPU: {cpu_model()}; profile of bf16 batch-1 decode after a {args.prompt}-token prompt, "
              f"{args.profile_steps} steps")
        profile_step(model, prompt.tolist(), args.profile_steps, kv)
        return
    bw_gib = 0.25 if args.quick else 1.0
    bw = read_bandwidth(bw_gib, threads=torch.get_num_threads())
    print(f"CPU: {cpu_model()}; read bandwidth {bw:.1f} GB/s ({torch.get_num_threads()} threads, float32 sum "
          f"over {bw_gib} GiB, best of 5)")
    t = time.perf_counter()
    base = herd.build_model(cfg, dtype=torch.bfloat16, seed=0).eval()
    counts = herd.count_params(cfg)
    emb = cfg.text.vocab_size * cfg.text.hidden_size
    print(f"model: {counts['total'] / 1e6:.0f}M total, {(counts['active'] - emb) / 1e6:.0f}M active per token "
          f"(without the embedding table); built in {time.perf_counter() - t:.1f}s")
    g = torch.Generator().manual_seed(0)
    V = cfg.text.vocab_size
    ids = torch.randint(2, V, (1, args.prompt), generator=g)
    batch_prompts = {B: [torch.randint(2, V, (args.batch_prompt,), generator=g).tolist() for _ in range(B)]
                     for B in args.batches}

    hf = None
    if not args.no_transformers:
        t = time.perf_counter()
        hf = hf_numbers(base, ids, args.new, args.repeat)
        print(f"transformers bf16: prefill {hf[0]:.0f} tok/s, decode {hf[1]:.1f} tok/s "
              f"({time.perf_counter() - t:.0f}s)")

    variants = ([("bf16", None, None)] + [("int8", 8, None)]
                + ([("int8, int8 activations", 8, "int8")] if args.int8_act else [])
                + ([("int4", 4, None)] if args.int4 else []))
    models, pre, batched = {}, {}, {}
    for name, bits, act in variants:  # prefill and batched decode, one variant after another
        model = herd.build_model(cfg, dtype=torch.bfloat16, seed=0).eval()
        model = quantize_model(model, bits=bits, activations=act) if bits else optimize_for_inference(model)
        gc.collect()
        pre[name] = herd_prefill(model, ids, args.repeat, 512)
        batched[name] = [herd_decode(model, batch_prompts[B], args.new, kv) for B in args.batches]
        models[name] = model
        print(f"herd {name}: prefill {pre[name]:.0f} tok/s, batched {[round(b) for b in batched[name]]} "
              f"(load {load_average().split()[0]})", flush=True)
    public = None
    if not args.no_public:  # README's way: save, herd.load_model (a trainable model), herd.generate
        with tempfile.TemporaryDirectory() as d:
            herd.save_model(base, d)
            public = herd.load_model(d, dtype=torch.bfloat16)
    # Decode at batch 1, the variants taking turns for --rounds rounds (median per variant): the
    # machine's speed drifts by tens of percent within minutes, and turns spread the drift evenly.
    dec = {name: [] for name in [*models, *([PUBLIC] if public is not None else [])]}
    gen = {name: [] for name in dec}
    for r in range(args.rounds):
        for name, model in models.items():
            dec[name].append(herd_decode(model, [ids[0].tolist()], args.new, kv))
            if not args.no_general:
                gen[name].append(general_path(model, [ids[0].tolist()], args.new, kv))
            if name == "bf16" and public is not None:
                dec[PUBLIC].append(public_decode(public, ids[0].tolist(), args.new, kv))
        print(f"round {r + 1}: " + ", ".join(f"{n} {dec[n][-1]:.1f}" + (f" (general {gen[n][-1]:.1f})" if gen[n] else "")
                                           for n in dec) + f" tok/s (load {load_average().split()[0]})", flush=True)
    rows, stream = [], []
    bits_of = {name: bits for name, bits, _ in variants}
    for name in dec:
        d = median(dec[name])
        per_tok = bytes_per_token(cfg, bits_of.get(name, None))
        stream.append([f"herd {name}", f"{d:.1f}", f"{per_tok / 1e6:.0f}", f"{d * per_tok / 1e9:.1f}",
                       f"{d * per_tok / 1e9 / bw:.0%}"])
        if name == PUBLIC:
            rows.append([f"herd {name} (herd.load_model + herd.generate)", "–", f"{d:.1f}"]
                        + ["–"] * len(args.batches) + ([f"– / {d / hf[1]:.1f}×"] if hf else []))
            continue
        rows.append([f"herd {name}", f"{pre[name]:.0f}", f"{d:.1f}"] + [f"{b:.0f}" for b in batched[name]]
                    + ([f"{pre[name] / hf[0]:.1f}× / {d / hf[1]:.1f}×"] if hf else []))
        if gen[name]:
            g_ = median(gen[name])
            rows.append([f"herd {name} (general path)", "", f"{g_:.1f}"] + ["–"] * len(args.batches)
                        + ([f"– / {g_ / hf[1]:.1f}×"] if hf else []))
    if args.compile:
        model = models["bf16"]
        t = time.perf_counter()
        herd_decode(model, [ids[0, :64].tolist()], 4, kv, compile=True)  # compiles
        took = time.perf_counter() - t
        d = herd_decode(model, [ids[0].tolist()], args.new, kv, compile=True)
        rows.append(["herd bf16, compiled step", "", f"{d:.1f}"] + ["–"] * len(args.batches)
                    + ([f"– / {d / hf[1]:.1f}×"] if hf else []))
        print(f"herd bf16, compiled step: decode {d:.1f} tok/s, compile {took:.0f}s (load {load_average().split()[0]})")
    del models, public
    gc.collect()
    header = (["engine", f"prefill {args.prompt} (tok/s)", "decode B=1 (tok/s)"]
              + [f"decode B={B}, prompt {args.batch_prompt} (tok/s)" for B in args.batches]
              + (["vs transformers (prefill / decode)"] if hf else []))
    if hf:
        rows.append(["transformers bf16", f"{hf[0]:.0f}", f"{hf[1]:.1f}"] + ["–"] * len(args.batches) + ["1×"])
    other = "(FACTS: AMD EPYC, not this machine)"
    rows.append([f"llama.cpp BF16 {other}", LLAMA_CPP["prefill"], LLAMA_CPP["bf16"]] + ["–"] * len(args.batches)
                + ([""] if hf else []))
    rows.append([f"llama.cpp Q8_0 {other}", "–", LLAMA_CPP["int8"]] + ["–"] * len(args.batches)
                + ([""] if hf else []))
    print()
    print(markdown_table(header, rows))
    print()
    print(f"batch-1 decode as a weight stream (read bandwidth {bw:.1f} GB/s, {cpu_model()})"
          + (" — --quick: the small model sits in cache, fractions above 100% mean nothing:" if args.quick else ":"))
    print(markdown_table(["engine", "decode B=1 (tok/s)", "weight MB per token", "GB/s streamed",
                          "of read bandwidth"], stream))
    print(f"\nload average at end {load_average().split()[0]} (other processes on the machine make every number lower)")


if __name__ == "__main__":
    main()
