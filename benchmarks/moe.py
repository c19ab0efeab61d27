"""MoE layer forward+backward: herd's sparse grouped dispatch vs transformers' Llama4TextMoe.

Both layers hold identical weights (the parameter names match, so one state_dict loads into
both). transformers runs every token through every expert; herd computes only the routed
(token, expert) pairs. Prints times, the speed-up ratio, and the share of the machine's matmul
ceiling that herd's *active* FLOPs reach.

    python benchmarks/moe.py [--tokens 4096] [--experts 16 128] [--repeat 3]
"""

from __future__ import annotations

import argparse

import torch
from common import bench, machine, markdown_table, matmul_ceiling, quiet_transformers, setup_threads

from herd.config import TextConfig
from herd.model.moe import MoE


def make_layers(hidden: int, inner: int, experts: int, dtype: torch.dtype, seed: int = 0):
    transformers = quiet_transformers()
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    cfg = TextConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inner, intermediate_size_mlp=2 * inner,
                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, head_dim=hidden // 4,
                     num_local_experts=experts, num_experts_per_tok=1)
    ours = MoE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.02, generator=g)
    hf_cfg = transformers.Llama4TextConfig(hidden_size=hidden, intermediate_size=inner, num_local_experts=experts,
                                           num_experts_per_tok=1, num_hidden_layers=1, num_attention_heads=4,
                                           num_key_value_heads=4, head_dim=hidden // 4)
    theirs = Llama4TextMoe(hf_cfg)
    theirs.load_state_dict(ours.state_dict())
    return ours.to(dtype), theirs.to(dtype)


def fwd_bwd(layer, x):
    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y = layer(x)
        y = y[0] if isinstance(y, tuple) else y
        y.float().square().mean().backward()

    return step


def active_flops(tokens: int, hidden: int, inner: int, experts: int, top_k: int = 1) -> float:
    per_token = 2 * hidden * experts + (top_k + 1) * 3 * 2 * hidden * inner  # router + routed + shared
    return 3 * tokens * per_token  # forward + backward (≈ 2× forward)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inner", type=int, default=512)
    ap.add_argument("--experts", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    setup_threads()
    print(f"machine: {machine()}")
    ceilings = {dt: matmul_ceiling(dt) for dt in (torch.float32, torch.bfloat16)}
    print("matmul ceiling: " + ", ".join(f"{str(k)[6:]} {v:.0f} GFLOP/s" for k, v in ceilings.items()))
    rows = []
    for experts in args.experts:
        for dtype in (torch.float32, torch.bfloat16):
            ours, theirs = make_layers(args.hidden, args.inner, experts, dtype)
            x = torch.randn(args.tokens, args.hidden, dtype=dtype, requires_grad=True)
            with torch.no_grad():
                err = (ours(x) - theirs(x)[0]).abs().max().item()
            t_ours = bench(fwd_bwd(ours, x), repeat=args.repeat)
            t_theirs = bench(fwd_bwd(theirs, x), warmup=1 if experts <= 16 else 0, repeat=max(1, args.repeat // 2))
            flops = active_flops(args.tokens, args.hidden, args.inner, experts)
            share = flops / t_ours / 1e9 / ceilings[dtype]
            rows.append([experts, str(dtype)[6:], f"{t_theirs * 1e3:.0f}", f"{t_ours * 1e3:.1f}",
                         f"**{t_theirs / t_ours:.1f}×**", f"{share:.0%}", f"{err:.1e}"])
            print(rows[-1], flush=True)
    print()
    print(f"MoE layer fwd+bwd, hidden {args.hidden}, expert width {args.inner}, top-1 + shared expert, "
          f"{args.tokens} tokens")
    print(markdown_table(["experts", "dtype", "transformers ms", "herd ms", "speed-up", "herd share of ceiling",
                          "max |Δ out|"], rows))


if __name__ == "__main__":
    main()
