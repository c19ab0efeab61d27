"""MoE vs dense at equal compute: the tiny MoE against a dense model with the same *active*
parameters (the compute-matched baseline) and a dense model with the same *total* parameters.

The claim (Llama 4 model card; Switch Transformer, Fedus et al. 2021, Fig. 1; Mixtral): at the same
training FLOPs per token and the same tokens, a sparse MoE reaches a lower loss than the dense
model with its active parameter count, because it holds many more parameters than it runs.
The dense model with the MoE's total parameters is the other end: what the MoE's parameters
would give if every token paid for all of them (several times the FLOPs).

Arms (every layer's feed-forward; attention, embeddings, vision tower, data, seed identical):

    moe           the tiny preset: 16 routed experts (inner 256, top-1) + a shared expert (inner 256)
    dense_active  one SwiGLU of inner 512 = shared + one routed expert: same active params per token
                  (less the 4,096-weight router per layer)
    dense_total   one SwiGLU of inner 256 × 17 = 4,352: same total feed-forward params as the MoE

All arms train with the same recipe (herd.train.trainer, the tiny pre-training mix) for the same
steps × batch × seq tokens, one seed after another for each seed. Training FLOPs are
6 · N_active · tokens, N_active the parameters one text token runs through (herd.params, without
the embedding table, with the LM head); attention's score FLOPs are the same in every arm and not
counted. Writes OUT/moe_vs_dense.json, a markdown table and OUT/moe_vs_dense.png (validation loss
against training FLOPs), and copies the JSON and plot to benchmarks/results/ with --publish.

The claim is decided (`smoke` false) only when at least two seeds ran and every run ended at least
1 nat below the unigram baseline: before that both models are still learning token frequencies,
where experts have nothing to specialise on (the first 40-step run sat at 6.56 against 6.81).

    python benchmarks/moe_vs_dense.py [--steps 300] [--seeds 0 1 2] [--out runs/bench_moe_vs_dense] [--publish]
    HERD_THREADS=1 python benchmarks/moe_vs_dense.py --steps 400 --batch 8 --seq 128 --seeds 0 1 2 \
        --total-seeds 0 --out runs/bench_moe_vs_dense_400 --publish
                                        # the published run: ~12 min a run on one shared thread (no dense_total)
    python benchmarks/moe_vs_dense.py --smoke                  # 3 steps on 20 documents: the script runs
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from _runs import run, shared_assets
from common import machine, markdown_table, setup_threads

from herd import presets
from herd.params import count_params

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("moe", "dense_active", "dense_total")


def arm_config(arm: str):
    cfg = presets.get_config("tiny")
    t = cfg.text
    if arm == "dense_active":
        t.moe_layers, t.intermediate_size_mlp = [], t.intermediate_size * (1 + t.num_experts_per_tok)
    elif arm == "dense_total":
        t.moe_layers, t.intermediate_size_mlp = [], t.intermediate_size * (1 + t.num_local_experts)
    cfg.name = f"tiny-{arm}"
    return cfg


def register_arms() -> None:
    for arm in ARMS:
        presets.PRESETS[f"tiny-{arm}"] = lambda arm=arm: arm_config(arm)


def counts(arm: str) -> dict:
    c = count_params(arm_config(arm))
    b = c["breakdown"]
    return {"total": c["text_total"], "active": c["active"], "active_no_embed": c["active"] - b["embeddings"],
            "ffn_total": b["routed_experts"] + b["shared_expert"] + b["dense_mlp"] + b["router"]}


def one(out: Path, assets: dict, arm: str, seed: int, kw: dict) -> dict:
    done = out / "summary.json"
    if not (done.exists() and json.loads(done.read_text()).get("step") == kw["max_steps"]):
        t0 = time.perf_counter()
        run(out, assets, preset=f"tiny-{arm}", seed=seed, **kw)
        (out / "wall_s.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    curve = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    summary = json.loads(done.read_text())
    return {"val_loss": curve[-1][1], "baseline_unigram": summary["baseline_unigram"], "wall_s": summary["wall_s"],
            "curve": curve}


def plot(results: dict, tokens_per_step: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm in ARMS:
        r = results["arms"][arm]
        if not r["runs"]:
            continue
        flops_per_step = 6 * r["params"]["active_no_embed"] * tokens_per_step
        for i, run_ in enumerate(r["runs"]):
            xs = [s * flops_per_step for s, _ in run_["curve"]]
            ax.plot(xs, [v for _, v in run_["curve"]], color={"moe": "C0", "dense_active": "C1", "dense_total": "C2"}[arm],
                    alpha=0.8, label=f"{arm} ({r['params']['active'] / 1e6:.1f}M active / "
                    f"{r['params']['total'] / 1e6:.1f}M total)" if i == 0 else None)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (6 · active params · tokens)")
    ax.set_ylabel("validation loss")
    ax.set_title("tiny Llama 4: MoE vs dense, same data and tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--bias-rate", type=float, default=0.01, help="MoE aux-loss-free balancing rate (make train's)")
    ap.add_argument("--total-seeds", type=int, help="run the dense_total arm (the most expensive, not part of the "
                    "claim) at only the first N seeds (default: every seed)")
    ap.add_argument("--max-docs", type=int, help="per data source (quick runs)")
    ap.add_argument("--out", default="runs/bench_moe_vs_dense")
    ap.add_argument("--publish", action="store_true", help="copy the JSON and plot to benchmarks/results/")
    ap.add_argument("--smoke", action="store_true", help="3 steps, 1 seed, 20 documents per source")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.seeds, args.max_docs, args.batch, args.seq = 3, [0], 20, 2, 64
    threads = setup_threads()
    register_arms()
    root = Path(args.out)
    assets = shared_assets(root)
    kw = dict(max_steps=args.steps, batch_size=args.batch, seq_len=args.seq, warmup=max(1, args.steps // 10),
              eval_every=max(1, args.steps // 6), eval_batches=8, log_every=max(1, args.steps // 6),
              threads=threads, max_docs=args.max_docs, bias_rate=args.bias_rate)
    tokens = args.steps * args.batch * args.seq
    results = {"machine": machine(), "steps": args.steps, "batch": args.batch, "seq": args.seq, "tokens": tokens,
               "seeds": args.seeds, "bias_rate": args.bias_rate,
               "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=ROOT).stdout.strip(),
               "arms": {a: {"params": counts(a), "runs": []} for a in ARMS}}
    for seed in args.seeds:  # every arm at one seed before the next seed: a cut-short sweep stays balanced
        for arm in ARMS:
            if arm == "dense_total" and args.total_seeds is not None and seed not in args.seeds[:args.total_seeds]:
                continue
            print(f"seed {seed} {arm} ...", flush=True)
            results["arms"][arm]["runs"].append(one(root / f"{arm}_s{seed}", assets, arm, seed, kw))
    rows = []
    for arm in ARMS:
        r = results["arms"][arm]
        if not r["runs"]:  # dense_total left out (--total-seeds 0)
            continue
        losses = [x["val_loss"] for x in r["runs"]]
        r["val_loss_mean"] = statistics.fmean(losses)
        r["val_loss_spread"] = (max(losses) - min(losses)) / 2
        r["n_seeds"] = len(losses)
        r["train_flops"] = 6 * r["params"]["active_no_embed"] * tokens
        rows.append([arm, len(losses), f"{r['params']['active']:,}", f"{r['params']['total']:,}", f"{r['train_flops']:.3g}",
                     f"{r['val_loss_mean']:.4f} ± {r['val_loss_spread']:.4f}"])
    moe, dense = results["arms"]["moe"], results["arms"]["dense_active"]
    margin = dense["val_loss_mean"] - moe["val_loss_mean"]
    # decided only past the unigram stage: every run at least 1 nat below the unigram baseline (a model still
    # learning token frequencies has no use for experts), and at least two seeds to measure the spread
    past_unigram = all(x["val_loss"] < x["baseline_unigram"] - 1.0 for x in moe["runs"] + dense["runs"])
    results["claim"] = {"name": "MoE beats dense with the same active parameters and tokens",
                        "threshold": "dense_active val loss − MoE val loss > both arms' spreads",
                        "margin": margin,
                        "pass": margin > moe["val_loss_spread"] + dense["val_loss_spread"] and len(args.seeds) > 1,
                        "smoke": args.smoke or len(args.seeds) < 2 or not past_unigram}
    print(f"machine: {results['machine']}; {tokens:,} tokens per run, seeds {args.seeds}")
    print(markdown_table(["arm", "seeds", "active params", "total params", "training FLOPs", "val loss (mean ± half-range)"],
                         rows))
    print(f"claim: {results['claim']['name']}: margin {margin:+.4f} → {'PASS' if results['claim']['pass'] else 'FAIL'}")
    (root / "moe_vs_dense.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.batch * args.seq, root / "moe_vs_dense.png")
    if args.publish:
        dest = ROOT / "benchmarks" / "results"
        for f in ("moe_vs_dense.json", "moe_vs_dense.png"):
            shutil.copy(root / f, dest / f)


if __name__ == "__main__":
    main()
