"""herd against llama.cpp, decode at batch 1, the two engines alternating in one window.

This machine's memory bandwidth drifts with its neighbours (llama.cpp's BF16 decode measured 55 and
77 tok/s an hour apart), so figures taken minutes apart compare the machine, not the engines. Here
every round runs llama.cpp and herd back to back on the same model and context, and the report is
the median over rounds of each round's ratio.

    python benchmarks/vs_llamacpp.py --llama-bench PATH --gguf-bf16 F.gguf --gguf-q8 F.gguf
    scripts/llamacpp_side_by_side.sh    # builds llama-bench, writes the GGUFs, then runs this

Per round, each decoding --tokens tokens after a --depth-token context at 2 threads:
  llama.cpp BF16 (`llama-bench -p 0 -n T -d D -r 1`)  vs herd bf16;
  llama.cpp Q8_0                                       vs herd int8 weight-only and int8 + int8
                                                          activations (herd quantize --activations int8).
tokens/s is tokens ÷ the total decode time on both sides (llama-bench's definition); herd decodes
through herd.Engine with greedy sampling, as benchmarks/decode.py does. The model is decode.py's
random 552M-total / 123M-active Llama 4 (seed 0), the same weights the GGUFs were converted from.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess

import torch
from common import load_average, machine, markdown_table, setup_threads
from decode import herd_decode, model_config

import herd
from herd.inference import native
from herd.inference.fast import optimize_for_inference
from herd.inference.quant import quantize_model


def llama_decode(bench: str, gguf: str, tokens: int, depth: int, threads: int) -> float:
    """llama.cpp decode tok/s: one llama-bench run of `tokens` generated after `depth` cached."""
    out = subprocess.run([bench, "-m", gguf, "-t", str(threads), "-p", "0", "-n", str(tokens), "-d", str(depth),
                          "-r", "1", "-o", "json"], capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", required=True, help="path of llama.cpp's llama-bench binary")
    ap.add_argument("--gguf-bf16", required=True)
    ap.add_argument("--gguf-q8", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64, help="decoded tokens per measurement")
    ap.add_argument("--depth", type=int, default=0,
                    help="context cached before decoding starts (llama-bench -d; herd: a prompt of max(1, D) "
                         "tokens). On this machine llama.cpp's Q8_0 prefill dies with SIGILL (its AMX int8 "
                         "path), so Q8_0 rows need depth 0")
    args = ap.parse_args()
    threads = setup_threads()
    print(f"# herd vs llama.cpp, decode at batch 1 — {machine()}; "
          f"load average at start {load_average().split()[0]}")
    print(f"herd's native kernels: {'loaded' if native.available() else native.why_unavailable()}")
    cfg = model_config(False)
    models = {"bf16": optimize_for_inference(herd.build_model(cfg, dtype=torch.bfloat16, seed=0).eval()),
              "int8": quantize_model(herd.build_model(cfg, dtype=torch.bfloat16, seed=0).eval(), bits=8),
              "int8a8": quantize_model(herd.build_model(cfg, dtype=torch.bfloat16, seed=0).eval(), bits=8,
                                       activations="int8")}
    prompt = torch.randint(2, cfg.text.vocab_size, (max(1, args.depth),),
                           generator=torch.Generator().manual_seed(0)).tolist()
    for m in models.values():  # warm-up: first products build kernels and fault pages in
        herd_decode(m, [prompt[:32]], 8)
    failed: set[str] = set()
    pairs = [("llama.cpp BF16", args.gguf_bf16, "herd bf16", "bf16"),
             ("llama.cpp Q8_0", args.gguf_q8, "herd int8 (weight-only)", "int8"),
             ("llama.cpp Q8_0", args.gguf_q8, "herd int8 + int8 activations", "int8a8")]
    ratios: dict[str, list[float]] = {name: [] for _, _, name, _ in pairs}
    speeds: dict[str, list[float]] = {}
    for r in range(args.rounds):
        line = []
        for peer, gguf, name, key in pairs:
            if peer in failed:
                continue
            try:
                lc = llama_decode(args.llama_bench, gguf, args.tokens, args.depth, threads)
            except subprocess.CalledProcessError as e:
                print(f"{peer} failed ({e}); its rows are left out")
                failed.add(peer)
                continue
            ours = herd_decode(models[key], [prompt], args.tokens + 1, stat="mean")
            ratios[name].append(ours / lc)
            speeds.setdefault(peer, []).append(lc)
            speeds.setdefault(name, []).append(ours)
            line.append(f"{name} {ours:.1f} / {peer} {lc:.1f} = {ours / lc:.2f}×")
        print(f"round {r + 1}: " + "; ".join(line) + f" (load {load_average().split()[0]})", flush=True)
    rows = []
    for peer, _, name, _ in pairs:
        rs = ratios[name]
        if not rs:
            continue
        rows.append([name, f"{statistics.median(speeds[name]):.1f}", peer, f"{statistics.median(speeds[peer]):.1f}",
                     f"**{statistics.median(rs):.2f}×**", f"{min(rs):.2f}–{max(rs):.2f}×"])
    print()
    print(markdown_table(["herd", "tok/s (median)", "llama.cpp", "tok/s (median)", "ratio (median of rounds)",
                          "ratio range"], rows))
    print(f"\n{args.rounds} rounds of {args.tokens} tokens after a {args.depth}-token context (herd: "
          f"{len(prompt)}-token prompt); "
          f"load average at end {load_average().split()[0]}")


if __name__ == "__main__":
    main()
