"""FP8 training parity: the tiny run's loss curve in FP8 (emulated on CPU) against bf16.

Same seed, data, init and schedule; only the matmul precision differs. The claim tested
(Meta trained Llama 4 in FP8 without quality loss): FP8 losses stay within ~1% of bf16.

    python benchmarks/fp8_parity.py [--steps 200]
Writes OUT/fp8_parity.png (default OUT: runs/bench_fp8).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _runs import run, shared_assets
from common import machine, markdown_table, setup_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--out", default="runs/bench_fp8")
    args = ap.parse_args()
    setup_threads()
    print(f"machine: {machine()}")
    root = Path(args.out)
    assets = shared_assets(root)
    curves = {}
    for name, fp8 in (("bf16", None), ("fp8 tensorwise", "tensorwise"), ("fp8 rowwise", "rowwise")):
        rows = run(root / name.replace(" ", "_"), assets, fp8=fp8, max_steps=args.steps, batch_size=args.batch,
                   seq_len=args.seq, warmup=args.steps // 10, eval_every=args.steps // 4, eval_batches=8,
                   log_every=1)
        curves[name] = rows
        print(f"{name}: final train loss {rows[-1]['loss']:.4f}, val loss {rows[-1]['val_loss']:.4f}", flush=True)
    ref = curves["bf16"]
    tail = max(1, args.steps // 4)
    table = []
    for name, rows in curves.items():
        mean_tail = sum(r["loss"] for r in rows[-tail:]) / tail
        ref_tail = sum(r["loss"] for r in ref[-tail:]) / tail
        rel = [abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(rows, ref)]
        table.append([name, f"{mean_tail:.4f}", f"{rows[-1]['val_loss']:.4f}",
                      f"**{(mean_tail / ref_tail - 1) * 100:+.2f}%**",
                      f"{(rows[-1]['val_loss'] / ref[-1]['val_loss'] - 1) * 100:+.2f}%", f"{max(rel) * 100:.2f}%",
                      f"{sum(r['tokens_per_s'] for r in rows[1:]) / max(1, len(rows) - 1):,.0f}"])
    print()
    print(f"tiny preset, {args.steps} steps of {args.batch}×{args.seq} tokens; last {tail} steps averaged")
    print(markdown_table(["precision", f"train loss (last {tail})", "final val loss", "train Δ vs bf16",
                          "val Δ vs bf16", "max per-step |Δ|", "tokens/s"], table))
    plot(curves, root / "fp8_parity.png")


def plot(curves, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, rows in curves.items():
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title("FP8 (emulated) vs bf16, tiny preset")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
