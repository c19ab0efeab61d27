"""MetaP transfer: does the best learning rate stay put across widths?

Learning-rate sweep of the tiny recipe at three widths, with MetaP (μP-style init and per-layer
LR multipliers relative to a base width) and without (standard init, one LR). The peer is the
same model trained without MetaP in the same run. The claim tested: with MetaP the best LR is
the same at every width; without it the best LR drifts (down as width grows).

    python benchmarks/metap_transfer.py [--widths 128 256 512] [--lrs 1e-3 3e-3 1e-2 3e-2] [--steps 120]
Writes OUT/metap_transfer.png and OUT/metap_transfer.json (default OUT: runs/bench_metap), with the
report card's claim block {"claim": {"pass", "margin", "smoke"}, "commit"}:

    python benchmarks/metap_transfer.py --add-claim benchmarks/results/metap_transfer.json --commit ce6b5df
                                         # the verdict of a finished sweep, without rerunning it
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import subprocess
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm import tqdm

from _runs import run, shared_assets
from common import machine, markdown_table, setup_threads


def one_run(out: Path, assets: dict, kw: dict) -> float:
    """Final validation loss of one run (reused when the run already finished: sweeps can resume)."""
    done = out / "summary.json"
    if done.exists():
        summary = json.loads(done.read_text())
        if summary.get("step") == kw["max_steps"] and "val_loss" in summary:
            return float(summary["val_loss"])
    rows = run(out, assets, **kw)
    return float(rows[-1].get("val_loss", float("nan")))


def claim(spread: dict) -> dict:
    """The report card's claim block (herd/evals/report.py CLAIMS): MetaP's best LR is the same at every
    width (zero spread over the LR grid) while the standard parametrization's drifts.
    margin = standard's spread − MetaP's, in decades of learning rate."""
    return {"name": "MetaP: the best learning rate transfers across widths",
            "threshold": "best LR identical at every width with MetaP, different without",
            "pass": spread["metap"] == 0 and spread["standard"] > 0,
            "margin": spread["standard"] - spread["metap"], "smoke": False}


def add_claim(path: Path, commit: str | None = None) -> dict:
    """Add the claim block to an existing metap_transfer.json (its spreads are already in it)."""
    data = json.loads(path.read_text())
    data["claim"] = claim(data["spread_decades"])
    if commit:
        data.setdefault("commit", commit)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default="runs/bench_metap")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (each with cores/jobs threads)")
    ap.add_argument("--add-claim", metavar="JSON", help="only add the claim block to an existing result file")
    ap.add_argument("--commit", help="with --add-claim: the commit that produced the file")
    args = ap.parse_args()
    if args.add_claim:
        print(json.dumps(add_claim(Path(args.add_claim), args.commit)["claim"]))
        return
    setup_threads()
    print(f"machine: {machine()}")
    root = Path(args.out)
    assets = shared_assets(root)
    jobs = [(mode, width, lr) for mode in ("metap", "standard") for width in args.widths for lr in args.lrs]
    common = dict(max_steps=args.steps, batch_size=args.batch, seq_len=args.seq, warmup=max(1, args.steps // 10),
                  metap_base_width=min(args.widths), eval_every=args.steps, eval_batches=4, log_every=args.steps,
                  threads=max(1, torch.get_num_threads() // args.jobs))
    results: dict = {}
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(one_run, root / f"{m}_w{w}_lr{lr:g}", assets, dict(common, width=w, lr=lr,
                                                                                     metap=m == "metap")): (m, w, lr)
                   for m, w, lr in jobs}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="runs"):
            mode, width, lr = futures[fut]
            val = fut.result()
            results[(mode, width, lr)] = val if math.isfinite(val) else float("inf")
            tqdm.write(f"{mode:8s} width {width:4d} lr {lr:.0e}: val loss {val:.4f}")

    header = ["mode", "width"] + [f"lr {lr:g}" for lr in args.lrs] + ["best lr"]
    rows, best = [], {}
    for mode in ("metap", "standard"):
        for width in args.widths:
            vals = [results[(mode, width, lr)] for lr in args.lrs]
            b = args.lrs[min(range(len(vals)), key=vals.__getitem__)]
            best[(mode, width)] = b
            rows.append([mode, width] + [f"{v:.3f}" for v in vals] + [f"**{b:g}**"])
    print()
    print(f"validation loss after {args.steps} steps ({args.batch}×{args.seq} tokens/step), tiny recipe")
    print(markdown_table(header, rows))
    spread = {m: math.log10(max(best[(m, w)] for w in args.widths) / min(best[(m, w)] for w in args.widths))
              for m in ("metap", "standard")}
    print(f"\nbest-LR spread across widths (decades): MetaP {spread['metap']:.2f}, standard {spread['standard']:.2f}")
    (root / "metap_transfer.json").write_text(json.dumps(
        {"results": [{"mode": m, "width": w, "lr": lr, "val_loss": v} for (m, w, lr), v in results.items()],
         "best_lr": {f"{m}/{w}": b for (m, w), b in best.items()}, "spread_decades": spread, "claim": claim(spread),
         "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                  cwd=Path(__file__).resolve().parent).stdout.strip()}, indent=2))
    plot(results, args, root / "metap_transfer.png")


def plot(results, args, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110, sharey=True)
    for ax, mode in zip(axes, ("metap", "standard")):
        for width in args.widths:
            ax.plot(args.lrs, [results[(mode, width, lr)] for lr in args.lrs], "o-", label=f"width {width}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title("MetaP" if mode == "metap" else "standard (no MetaP)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(png)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
