"""Does model-judged pruning of easy SFT data pay? Full data vs the easiest 50% pruned vs a random
50% vs the easiest 95% pruned (Behemoth's setting), at equal steps.

    herd train --preset tiny --max-steps 600 --out runs/tiny          # (make train) the base model
    herd data sft --out runs/sft_data                                  # the chat data, train/val/test
    python benchmarks/sft_pruning.py --init runs/tiny --data runs/sft_data --steps 300 --seeds 0,1 \
        --out runs/sft_pruning --result benchmarks/results/sft_pruning.json
    python benchmarks/sft_pruning.py --smoke                           # a seconds-long check of the script

Every arm starts from the same model and runs the same number of optimizer steps with the same
batch (herd sft; the pruned arms see fewer distinct examples, repeated more often). The pruned
arms share one set of difficulty scores (pass@k on verifiable items, reference loss otherwise,
computed once by the first pruned arm, reused by every seed: the base model judges once;
`--prune-k 0` skips pass@k and ranks by reference loss alone, for a base model that passes ~none
of the items, where pass@k ties everywhere and the loss decides anyway). Each
final model answers the held-out items greedily (herd's engine, up to --max-new tokens; the
--eval-splits, by default val and test pooled: neither is trained on); per task: accuracy of the
verifiable items, and for all items the rate at which replies end with the end-of-turn token (the
model learned to stop). Each arm runs once per seed in --seeds (the seed sets the batch order, the
random-50 subset and sampling); the headline number of an arm is its macro accuracy (mean over
verifiable tasks), reported as the mean over seeds ± the spread (half the range across seeds).
The claim to test (Llama 4's "lightweight SFT"): pruned-50 matches full within noise on about half
the tokens and beats random-50. The report card's verdict (herd.evals.report.CLAIMS): pass when
pruned-50's mean held-out accuracy ≥ full's; margin = the difference.

Writes OUT/results.json, OUT/table.md, OUT/pruning.png, each arm's run directory (OUT/seedS/ARM),
and with --result FILE the report-card JSON ({"claim": {...}, "commit": ..., "table": ...}).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ARMS = {  # name: (prune fraction, mode)
    "full": (0.0, "model"),
    "pruned50": (0.5, "model"),
    "random50": (0.5, "random"),
    "pruned95": (0.95, "model"),
}


def evaluate(run_dir: Path, held_out: list[Path], max_new: int, limit_per_task: int) -> dict:
    """Per task: n, accuracy on verifiable items (None if none), rate of replies ending with end-of-turn."""
    import herd
    from herd.data.chat_data import verify
    from herd.train.chat_rows import BadLines, load_examples
    from herd.train.prune import prompt_of, sample_replies

    model = herd.load_model(run_dir)
    tok = herd.load_tokenizer(run_dir)
    examples = [ex for path in held_out for ex in load_examples(path, tok, model.config.vision, 10**6, BadLines(True))]
    by_task: dict[str, list] = {}
    for ex in examples:
        if len(by_task.setdefault(ex.row.get("task", "?"), [])) < limit_per_task:
            by_task[ex.row.get("task", "?")].append(ex)
    chosen = [ex for items in by_task.values() for ex in items]
    prompts = [prompt_of(tok, ex, model.config.vision) for ex in chosen]
    replies = sample_replies(model, tok, prompts, 1, max_new, temperature=0.0, progress=False, details=True)
    out: dict = {}
    for ex, [(text, stopped)] in zip(chosen, replies):
        t = out.setdefault(ex.row.get("task", "?"), {"n": 0, "verified": 0, "correct": 0.0, "stopped": 0})
        t["n"] += 1
        t["stopped"] += int(stopped)
        score = verify(ex.row, text)
        if score is not None:
            t["verified"] += 1
            t["correct"] += score
    return {task: {"n": t["n"], "accuracy": (t["correct"] / t["verified"]) if t["verified"] else None,
                   "eot_rate": t["stopped"] / t["n"]} for task, t in sorted(out.items())}


def macro_accuracy(tasks: dict) -> float | None:
    """Mean accuracy over the tasks that have a verifier."""
    accs = [e["accuracy"] for e in tasks.values() if e["accuracy"] is not None]
    return sum(accs) / len(accs) if accs else None


def mean_spread(values: list[float]) -> tuple[float, float]:
    """(mean, half the range) over seeds."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def summarize(per_seed: dict) -> dict:
    """{arm: {accuracy: [mean, spread], eot_rate: [...], tasks: {task: [mean, spread]}, per_seed: [...]}}."""
    arms: dict = {}
    for seed, results in per_seed.items():
        for arm, r in results.items():
            arms.setdefault(arm, []).append(r)
    out = {}
    for arm, runs in arms.items():
        tasks = sorted({t for r in runs for t, e in r["tasks"].items() if e["accuracy"] is not None})
        eot = [sum(e["eot_rate"] * e["n"] for e in r["tasks"].values()) / sum(e["n"] for e in r["tasks"].values())
               for r in runs]
        out[arm] = {"prune": runs[0]["prune"], "mode": runs[0]["mode"], "examples": runs[0]["examples"],
                    "loss_tokens": mean_spread([r["loss_tokens"] for r in runs])[0],
                    "accuracy": mean_spread([macro_accuracy(r["tasks"]) or 0.0 for r in runs]),
                    "eot_rate": mean_spread(eot),
                    "tasks": {t: mean_spread([r["tasks"][t]["accuracy"] for r in runs]) for t in tasks},
                    "seeds": len(runs)}
    return out


def smoke_assets(root: Path) -> tuple[Path, Path]:
    """A random tiny model with a small trained tokenizer, and a small chat data set (smoke runs)."""
    import herd
    from herd.data import training_texts
    from herd.data.chat_data import build
    from herd.tokenizer_train import train_tokenizer

    model_dir = root / "base"
    if not (model_dir / "config.json").exists():
        texts = [t for _, t in zip(range(60), training_texts(limit=20))]
        train_tokenizer(texts, herd.get_config("tiny").text.vocab_size, model_dir)
        herd.save_model(herd.build_model("tiny", seed=0), model_dir)
    data = root / "data"
    if not (data / "train.jsonl").exists():
        build(data, per_task=12, tasks=("chain_sum", "digits_vqa", "calculator"), progress=False)
    return model_dir, data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", help="base model directory (herd train's --out)")
    ap.add_argument("--data", help="herd data sft output directory (train/val/test.jsonl)")
    ap.add_argument("--out", default="runs/sft_pruning")
    ap.add_argument("--arms", default=",".join(ARMS), help="subset of " + ",".join(ARMS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--prune-k", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=24, help="tokens per held-out reply")
    ap.add_argument("--eval-per-task", type=int, default=100)
    ap.add_argument("--val-every", type=int, default=None, help="validation loss every N steps (default: 4 times a run)")
    ap.add_argument("--eval-splits", default="val,test", help="held-out files (DATA/NAME.jsonl) pooled for accuracy")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; every arm runs once per seed")
    ap.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds S)")
    ap.add_argument("--result", default=None, help="also write the report-card JSON here "
                                                   "(e.g. benchmarks/results/sft_pruning.json)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--from-partial", action="store_true", help="no training: summarise OUT/per_seed.partial.json "
                                                                "(the arms an interrupted run finished)")
    ap.add_argument("--no-base", action="store_true", help="skip evaluating the base model")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 12 items per task, 2 steps")
    args = ap.parse_args()
    out = Path(args.out if not args.smoke or args.out != "runs/sft_pruning" else "runs/sft_pruning_smoke")
    out.mkdir(parents=True, exist_ok=True)
    seeds = [args.seed] if args.seed is not None else [int(x) for x in args.seeds.split(",") if x.strip()]
    if args.smoke:
        init, data = smoke_assets(out)
        args.steps, args.batch_size, args.eval_per_task, args.max_new, args.prune_k = 2, 2, 4, 4, 2
    else:
        if not args.init or not args.data:
            ap.error("--init and --data are required (or --smoke)")
        init, data = Path(args.init), Path(args.data)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    held_out = [data / f"{name.strip()}.jsonl" for name in args.eval_splits.split(",") if name.strip()]
    import torch

    from herd.train.sft import SFTConfig, sft

    if args.threads:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    per_seed: dict[int, dict] = {}
    scores = None
    if args.from_partial:  # summarise the arms an interrupted run finished
        partial = json.loads((out / "per_seed.partial.json").read_text())
        per_seed = {int(k): v for k, v in partial.items()}
        arms = []
    for arm in arms:  # arm-major: the full / pruned50 pair of every seed comes first
        for seed in seeds:
            results = per_seed.setdefault(seed, {})
            prune, mode = ARMS[arm]
            run_dir = out / f"seed{seed}" / arm
            t0 = time.perf_counter()
            summary = sft(SFTConfig(init=str(init), data=str(data / "train.jsonl"), val_data=str(data / "val.jsonl"),
                                    out=str(run_dir), max_steps=args.steps, batch_size=args.batch_size,
                                    seq_len=args.seq_len, lr=args.lr, warmup=args.warmup, prune=prune, prune_mode=mode,
                                    prune_k=args.prune_k, prune_scores=scores if mode == "model" else None,
                                    skip_bad=True, seed=seed, progress=not args.smoke, ckpt_every=10**9, keep=1,
                                    eval_every=args.val_every or max(1, args.steps // 4)))
            if prune and mode == "model" and scores is None:
                scores = str(run_dir / "prune" / "scores.jsonl")
            evals = evaluate(run_dir, held_out, args.max_new, args.eval_per_task)
            results[arm] = {"prune": prune, "mode": mode, "examples": summary.get("kept", summary.get("examples")),
                            "loss_tokens": summary["tokens"], "val_loss": summary.get("val_loss"), "tasks": evals,
                            "accuracy": macro_accuracy(evals), "wall_s": round(time.perf_counter() - t0, 1)}
            print(f"seed {seed} {arm}: {json.dumps(results[arm])}", flush=True)
            (out / "per_seed.partial.json").write_text(json.dumps(per_seed, indent=2) + "\n")  # survives a kill
    base_eval = None if args.no_base else evaluate(init, held_out, args.max_new, args.eval_per_task)  # the start
    print(f"base: {json.dumps(base_eval)}", flush=True)
    agg = summarize(per_seed)
    setup = {"init": str(init), "data": str(data), "steps": args.steps, "batch_size": args.batch_size,
             "seq_len": args.seq_len, "lr": args.lr, "prune_k": args.prune_k, "max_new": args.max_new,
             "eval_splits": args.eval_splits, "eval_per_task": args.eval_per_task, "seeds": sorted(per_seed),
             "threads": torch.get_num_threads(), "wall_s": round(time.perf_counter() - t_all, 1)}
    results = {"setup": setup, "base": base_eval, "summary": agg, "per_seed": {str(k): v for k, v in per_seed.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = render(agg, base_eval)
    (out / "table.md").write_text(table)
    print(table)
    plot(agg, base_eval, out / "pruning.png")
    if args.result:
        card = report_card(agg, results, table, args.smoke)
        Path(args.result).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result).write_text(json.dumps(card, indent=2) + "\n")
        print(f"claim: {card['claim']} → {args.result}")
    return 0


def report_card(agg: dict, results: dict, table: str, smoke: bool) -> dict:
    """The report card's result file (herd.evals.report.CLAIMS): pruned-50 accuracy ≥ full's."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    claim: dict = {"pass": None, "margin": None, "smoke": smoke,
                   "statement": "held-out accuracy (macro over verifiable tasks, mean over seeds) of pruned50 ≥ full's"}
    if "full" in agg and "pruned50" in agg:
        margin = agg["pruned50"]["accuracy"][0] - agg["full"]["accuracy"][0]
        noise = agg["pruned50"]["accuracy"][1] + agg["full"]["accuracy"][1]
        claim.update({"pass": margin >= 0, "margin": round(margin, 4), "spread": round(noise, 4),
                      "within_noise": abs(margin) <= noise})
        if max(agg["pruned50"]["accuracy"][0], agg["full"]["accuracy"][0]) == 0.0:  # 0 ≥ 0 is no evidence
            claim.update({"pass": None, "note": "no signal: both arms at 0 held-out accuracy"})
    if "random50" in agg and "pruned50" in agg:
        claim["margin_vs_random50"] = round(agg["pruned50"]["accuracy"][0] - agg["random50"]["accuracy"][0], 4)
    return {"claim": claim, "commit": commit, "setup": results["setup"], "base": results["base"],
            "summary": agg, "per_seed": results["per_seed"], "table": table}


def _ms(v) -> str:
    return f"{v[0]:.3f} ± {v[1]:.3f}"


def render(agg: dict, base: dict | None = None) -> str:
    """Markdown: one row per arm, macro accuracy and per-task accuracy as mean ± spread over seeds."""
    tasks = sorted({t for r in agg.values() for t in r["tasks"]})
    head = "| arm | seeds | examples kept | loss tokens | accuracy (macro) | eot rate | " + " | ".join(tasks) + " |"
    lines = [head, "|" + "---|" * (6 + len(tasks))]
    if base:
        accs = macro_accuracy(base)
        eot = sum(e["eot_rate"] * e["n"] for e in base.values()) / max(sum(e["n"] for e in base.values()), 1)
        lines.append(f"| base (no SFT) | – | – | – | {accs or 0:.3f} | {eot:.3f} | "
                     + " | ".join(f"{(base.get(t) or {}).get('accuracy') or 0:.3f}" for t in tasks) + " |")
    for arm, r in agg.items():
        lines.append(f"| {arm} | {r['seeds']} | {r['examples']} | {r['loss_tokens']:,.0f} | {_ms(r['accuracy'])} | "
                     f"{_ms(r['eot_rate'])} | " + " | ".join(_ms(r["tasks"][t]) if t in r["tasks"] else "–"
                                                            for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def plot(agg: dict, base: dict | None, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = sorted({t for r in agg.values() for t in r["tasks"]})
    if not tasks:
        return
    cols = ["macro"] + tasks
    fig, ax = plt.subplots(figsize=(1.4 * len(cols) + 3, 3.8), dpi=110)
    w = 0.8 / max(len(agg), 1)
    for i, (arm, r) in enumerate(agg.items()):
        vals = [r["accuracy"]] + [r["tasks"].get(t, (0.0, 0.0)) for t in tasks]
        ax.bar(np.arange(len(cols)) + i * w, [v[0] for v in vals], w, yerr=[v[1] for v in vals], capsize=2,
               label=f"{arm} ({r['examples']} ex, {r['loss_tokens']:,.0f} tok)")
    if base:
        ax.axhline(macro_accuracy(base) or 0.0, color="grey", lw=0.8, ls="--", label="base (no SFT), macro")
    ax.set_xticks(np.arange(len(cols)) + w * (len(agg) - 1) / 2, cols, fontsize=8)
    ax.set_ylabel("held-out accuracy (greedy)")
    seeds = max(r["seeds"] for r in agg.values())
    ax.set_title(f"SFT at equal steps: full vs model-pruned vs random ({seeds} seeds, bars: mean, whiskers: ± half range)",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
