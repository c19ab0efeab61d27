"""A full training step (forward, backward, AdamW) of a tiny Llama 4: herd vs transformers.

Same config, same weights (herd saves, transformers loads the directory), same batch, same loss
(mean next-token cross-entropy) and the same optimizer (torch AdamW). fp32 weights, and bf16
autocast. Prints tokens/s, the ratio, and the share of the matmul ceiling that the *active*
FLOPs (6 × active parameters × tokens, plus attention) reach.

    python benchmarks/train_step.py [--preset tiny] [--batch 8] [--seq 512]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile

import torch
import torch.nn.functional as F
from common import bench, machine, markdown_table, matmul_ceiling, quiet_transformers, setup_threads

import herd
from herd.params import count_params


def step_fn(model, logits_of, ids, labels, autocast: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            logits = logits_of(ids)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    setup_threads()
    transformers = quiet_transformers()
    print(f"machine: {machine()}")
    cfg = herd.get_config(args.preset).text_only()
    counts = count_params(cfg)
    tc = cfg.text
    tokens = args.batch * args.seq
    attn_flops = 6 * 2 * tc.num_hidden_layers * args.seq * tc.num_attention_heads * tc.head_dim * tokens / 2
    matmul_params = counts["active"] - counts["breakdown"]["embeddings"]  # the embedding is a gather
    flops = 6 * matmul_params * tokens + attn_flops
    ceilings = {dt: matmul_ceiling(dt) for dt in (torch.float32, torch.bfloat16)}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tc.vocab_size - 128, (args.batch, args.seq), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    rows = []
    for autocast in (False, True):
        ours = herd.build_model(cfg, seed=0).train()
        with tempfile.TemporaryDirectory() as d:
            herd.save_model(ours, d)
            theirs = transformers.Llama4ForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                                    attn_implementation="sdpa").train()
        t_ours = bench(step_fn(ours, ours, ids, labels, autocast), repeat=args.repeat)
        t_theirs = bench(step_fn(theirs, lambda x: theirs(input_ids=x).logits, ids, labels, autocast),
                         repeat=max(1, args.repeat - 1))
        dt = torch.bfloat16 if autocast else torch.float32
        share = flops / t_ours / 1e9 / ceilings[dt]
        rows.append([args.preset, "bf16 autocast" if autocast else "fp32", f"{args.batch}×{args.seq}",
                     f"{tokens / t_theirs:,.0f}", f"{tokens / t_ours:,.0f}", f"**{t_theirs / t_ours:.1f}×**",
                     f"{share:.0%}"])
        print(rows[-1], flush=True)
    print()
    print(f"training step (fwd + bwd + AdamW), {args.preset} text model: {counts['text_total']:,} parameters, "
          f"{counts['active']:,} active per token")
    print(markdown_table(["preset", "precision", "batch", "transformers tok/s", "herd tok/s", "speed-up",
                          "herd share of ceiling"], rows))


if __name__ == "__main__":
    main()
