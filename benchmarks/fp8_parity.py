"""FP8 training parity: the tiny run's loss curve in FP8 (emulated on CPU) against bf16.

Same seed, data, init and schedule; only the matmul precision differs. The claim tested
(Meta trained Llama 4 in FP8 without quality loss): FP8 losses stay within ~1% of bf16.

    python benchmarks/fp8_parity.py [--steps 200] [--publish]
Writes OUT/fp8_parity.png and OUT/fp8_parity.json (default OUT: runs/bench_fp8), with the report
card's claim block {"claim": {"pass", "margin", "smoke"}, "commit"} (herd/evals/report.py CLAIMS):
pass when every FP8 variant's final validation loss and last-quarter train loss are within 1% of
bf16's; margin = 1% − the largest |Δ| (as a fraction). --publish copies both to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

from _runs import run, shared_assets
from common import machine, markdown_table, setup_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--out", default="runs/bench_fp8")
    ap.add_argument("--publish", action="store_true", help="copy the JSON and plot to benchmarks/results/")
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
    table, deltas = [], {}
    for name, rows in curves.items():
        mean_tail = sum(r["loss"] for r in rows[-tail:]) / tail
        ref_tail = sum(r["loss"] for r in ref[-tail:]) / tail
        deltas[name] = {"train_tail": mean_tail / ref_tail - 1, "val": rows[-1]["val_loss"] / ref[-1]["val_loss"] - 1,
                        "val_loss": rows[-1]["val_loss"], "train_tail_loss": mean_tail}
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
    worst = max(abs(d[k]) for n, d in deltas.items() if n != "bf16" for k in ("train_tail", "val"))
    result = {"steps": args.steps, "tokens_per_step": args.batch * args.seq, "machine": machine(), "arms": deltas,
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(__file__).resolve().parent).stdout.strip(),
              "claim": {"name": "FP8 training matches bf16 loss", "threshold": "final val and train loss within 1%",
                        "pass": worst < 0.01, "margin": 0.01 - worst, "smoke": args.steps < 100}}
    (root / "fp8_parity.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"claim: FP8 within 1% of bf16: worst |Δ| {worst * 100:.2f}% → {'PASS' if result['claim']['pass'] else 'FAIL'}")
    if args.publish:
        for f in ("fp8_parity.json", "fp8_parity.png"):
            shutil.copy(root / f, Path(__file__).resolve().parent / "results" / f)


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
