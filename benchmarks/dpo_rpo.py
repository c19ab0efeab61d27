"""Does RPO's NLL term (`herd dpo --sft-coef α`, TRL's rpo_alpha) stop the chosen log-prob falling?

Plain DPO rewards only the gap between chosen and rejected log-probs, and the speedrun's DPO stage
shows the known failure: on held-out pairs both fall (BENCHMARKS.md, "DPO on held-out pairs").
RPO (Pang et al. 2024) adds α × the chosen completions' mean token NLL. This runs the speedrun's DPO
stage (same init, pairs, steps, β) once per α and reads, at every evaluation, TRL's eval metrics on
held-out pairs no stage trained on (the first 64 of --val-data, batches of 8):

    eval_logps/chosen, eval_logps/rejected   summed completion log-probs under the policy
    eval_rewards/chosen = β·(log π(y_w) − log π_ref(y_w)): below 0 means the chosen answer got less likely
    eval_rewards/accuracies                  the preference itself (must stay > 0.5)

Pairs over --max-len (512 tokens) are skipped and counted (skip_bad), as benchmarks/dpo_heldout.py skips them.

    python benchmarks/dpo_rpo.py --alphas 0,0.2 --steps 60 --result benchmarks/results/dpo_rpo.json
    python benchmarks/dpo_rpo.py --smoke     # seconds: a random tiny model, 2 steps per arm

Losses and log-probs do not depend on machine load (1 thread, fixed seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KEYS = ("eval_logps/chosen", "eval_logps/rejected", "eval_rewards/chosen", "eval_rewards/rejected",
        "eval_rewards/accuracies", "eval_rewards/margins", "eval_nll_loss")


def run_arm(alpha: float, args, out: Path) -> dict:
    from herd.train.dpo import DPOConfig, dpo

    cfg = DPOConfig(init=args.init, data=args.data, val_data=args.val_data, out=str(out), max_steps=args.steps,
                    sft_coef=alpha, eval_every=args.eval_every, log_every=args.eval_every, threads=args.threads,
                    ref_cache=str(Path(args.out) / "ref_cache"), progress=False, skip_bad=True, **args.extra)
    summary = dpo(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    curve = [{"step": r["step"], **{k: r[k] for k in KEYS if k in r}} for r in rows if "eval_logps/chosen" in r]
    return {"sft_coef": alpha, "final_loss": summary.get("loss"), "eval": curve}


def plot(result: dict, png: Path) -> None:
    """Held-out chosen / rejected log-probs against step, one line style per α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for arm in result["arms"]:
        steps = [e["step"] for e in arm["eval"]]
        for key, color in (("eval_logps/chosen", "tab:green"), ("eval_logps/rejected", "tab:red")):
            a.plot(steps, [e[key] for e in arm["eval"]], color=color, ls="-" if arm["sft_coef"] == 0 else "--",
                   label=f"{key.split('/')[-1]}, sft_coef {arm['sft_coef']:g}")
        b.plot(steps, [e["eval_rewards/accuracies"] for e in arm["eval"]], label=f"sft_coef {arm['sft_coef']:g}")
    first = result["arms"][0]["eval"][0]  # the reference's log-probs: logps − rewards/β (β 0.1, DPOConfig's)
    for key, color in (("chosen", "tab:green"), ("rejected", "tab:red")):
        a.axhline(first[f"eval_logps/{key}"] - first[f"eval_rewards/{key}"] / 0.1, color=color, ls=":", lw=1,
                  label=f"{key}, reference")
    a.set(xlabel="step", ylabel="held-out summed log-prob")
    b.set(xlabel="step", ylabel="held-out rewards/accuracies", ylim=(0, 1))
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.suptitle("DPO with and without RPO's NLL term (held-out pairs)")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", default="runs/speedrun/rl", help="the speedrun DPO stage's --init")
    ap.add_argument("--data", default="runs/speedrun/dpo_pairs/pairs.jsonl")
    ap.add_argument("--val-data", default="benchmarks/results/posttrain/dpo_heldout/pairs.jsonl",
                    help="held-out pairs (benchmarks/dpo_heldout.py builds them from the test split)")
    ap.add_argument("--alphas", default="0,0.2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/dpo_rpo")
    ap.add_argument("--result", default=None, help="JSON with every arm's eval curve")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    args.extra = {}
    if args.smoke:
        from benchmarks.sft_pruning import smoke_assets
        from herd.train.dpo import build_pairs

        args.out = "runs/dpo_rpo_smoke"
        ref_dir, data = smoke_assets(Path(args.out))
        build_pairs(ref_dir, data / "train.jsonl", Path(args.out) / "pairs", k=2, max_new=4, limit=4,
                    use_reference=True, progress=False)
        args.init, args.steps, args.eval_every = str(ref_dir), 2, 1
        args.data = args.val_data = str(Path(args.out) / "pairs" / "pairs.jsonl")
        args.extra = {"batch_size": 2, "max_len": 256, "bf16": False}
    arms = []
    for alpha in (float(a) for a in args.alphas.split(",")):
        out = Path(args.out) / f"alpha{alpha:g}"
        shutil.rmtree(out, ignore_errors=True)
        arms.append(run_arm(alpha, args, out))
        last = arms[-1]["eval"][-1]
        print(f"sft_coef {alpha:g}: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "step"))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    setup = {k: v for k, v in vars(args).items() if k not in ("result",)}
    result = {"commit": commit, "smoke": args.smoke, "setup": setup, "arms": arms}
    if args.result:
        Path(args.result).write_text(json.dumps(result, indent=2) + "\n")
        plot(result, Path(args.result).with_suffix(".png"))
        print(f"→ {args.result}, {Path(args.result).with_suffix('.png')}")
    if args.smoke:
        shutil.rmtree(args.out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
