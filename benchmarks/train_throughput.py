"""Training throughput (forward, backward, AdamW) of the tiny and small presets: herd vs transformers.

Same config, same weights (herd saves, transformers' Llama4ForCausalLM loads the directory), same
batch, same loss (mean next-token cross-entropy), same optimizer (torch AdamW, fused where the
installed torch has it, else foreach — as herd's trainer), fp32 weights and bf16 autocast. herd
runs its training path (`model(ids, labels=...)`: LM head fused with the loss in chunks);
transformers computes logits and F.cross_entropy on them. Steps of the two alternate, so a change
in the machine's load hits both; each side's best step counts.

Prints tokens/s, the ratio, and the share of this machine's measured matmul ceiling (in that
dtype) that herd's *active* FLOPs reach: 6 × active matmul parameters × tokens, plus attention
(12 · heads · head_dim per causal query-key pair, chunked layers counting pairs inside a chunk).

    python benchmarks/train_throughput.py [--presets tiny small] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from common import load_average, machine, markdown_table, matmul_ceiling, quiet_transformers, setup_threads

import herd
from herd.params import count_params

# batch × sequence per preset: small's is smaller so that transformers' steps finish in reasonable time
SHAPES = {"tiny": (8, 512), "small": (4, 512)}


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)


def make_step(model, loss_of, autocast: bool):
    opt = optimizer(model)

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = loss_of()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def active_flops(cfg, batch: int, seq: int) -> float:
    tc = cfg.text
    counts = count_params(cfg)
    tokens = batch * seq
    matmul_params = counts["active"] - counts["breakdown"]["embeddings"]  # the embedding is a gather
    pairs = 0  # causal query-key pairs per sequence, over all layers
    for layer in range(tc.num_hidden_layers):
        span = tc.attention_chunk_size if tc.is_chunked(layer) else seq
        full, rest = divmod(seq, span)
        pairs += full * span * (span + 1) // 2 + rest * (rest + 1) // 2
    return 6 * matmul_params * tokens + 12 * tc.num_attention_heads * tc.head_dim * pairs * batch


def run_preset(name: str, transformers, ceilings: dict, repeat: int, shape=None) -> list[list]:
    cfg = herd.get_config(name).text_only()
    tc = cfg.text
    batch, seq = shape or SHAPES.get(name, (8, 512))
    tokens = batch * seq
    flops = active_flops(cfg, batch, seq)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tc.vocab_size - 128, (batch, seq), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    counts = count_params(cfg)
    print(f"{name}: {counts['text_total']:,} parameters, {counts['active']:,} active per token; "
          f"batch {batch} × {seq}", flush=True)
    rows = []
    for autocast in (False, True):
        ours = herd.build_model(cfg, seed=0).train()
        with tempfile.TemporaryDirectory() as d:
            herd.save_model(ours, d)
            theirs = transformers.Llama4ForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                                    attn_implementation="sdpa").train()
        step_ours = make_step(ours, lambda: ours(ids, labels=labels) / labels.numel(), autocast)
        step_theirs = make_step(theirs, lambda: F.cross_entropy(theirs(input_ids=ids).logits.float().flatten(0, 1),
                                                                labels.flatten()), autocast)
        first = (step_ours(), step_theirs())  # warm-up, from identical weights: the losses agree
        t_ours, t_theirs = [], []
        for _ in range(repeat):
            for fn, times in ((step_ours, t_ours), (step_theirs, t_theirs)):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        t_ours, t_theirs = min(t_ours), min(t_theirs)
        dt = torch.bfloat16 if autocast else torch.float32
        share = flops / t_ours / 1e9 / ceilings[dt]
        precision = "bf16 autocast" if autocast else "fp32"
        rows.append([name, precision, f"{batch}×{seq}", f"{tokens / t_theirs:,.0f}", f"{tokens / t_ours:,.0f}",
                     f"**{t_theirs / t_ours:.1f}×**", f"{share:.0%}"])
        print(f"  {precision}: first-step loss herd {first[0]:.5f} transformers {first[1]:.5f}; "
              f"step herd {t_ours:.3f} s, transformers {t_theirs:.3f} s", flush=True)
        del ours, theirs
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--repeat", type=int, default=3, help="timed steps per side (best counts)")
    ap.add_argument("--shape", type=int, nargs=2, metavar=("BATCH", "SEQ"), help="override batch × seq")
    args = ap.parse_args()
    setup_threads()
    transformers = quiet_transformers()
    print(f"machine: {machine()}")
    print(f"load average at start: {load_average()}")
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print("warning: the machine is busier than its cores; threads that wait on each other make the "
              "figures unreliable (HERD_THREADS=1 is steadier on a shared machine)")
    ceilings = {dt: matmul_ceiling(dt) for dt in (torch.float32, torch.bfloat16)}
    print(f"matmul ceiling (2048³): fp32 {ceilings[torch.float32]:,.0f} GFLOP/s, "
          f"bf16 {ceilings[torch.bfloat16]:,.0f} GFLOP/s", flush=True)
    rows = []
    for name in args.presets:
        rows += run_preset(name, transformers, ceilings, args.repeat, args.shape)
    print(f"load average at end: {load_average()}")
    print()
    print("training step (fwd + bwd + AdamW), text models; small runs a smaller batch than tiny so that "
          "transformers finishes in reasonable time")
    print(markdown_table(["preset", "precision", "batch", "transformers tok/s", "herd tok/s", "speed-up",
                          "herd share of ceiling"], rows))


if __name__ == "__main__":
    main()
