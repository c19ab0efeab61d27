"""Does model-judged pruning of easy SFT data pay? Full data vs the easiest 50% pruned vs a random
50% vs the easiest 95% pruned (Behemoth's setting), at equal steps.

    herd train --preset tiny --max-steps 600 --out runs/tiny          # (make train) the base model
    herd data sft --out runs/sft_data                                  # the chat data, train/val/test
    python benchmarks/sft_pruning.py --init runs/tiny --data runs/sft_data --steps 300 --out runs/sft_pruning
    python benchmarks/sft_pruning.py --smoke                           # a seconds-long check of the script

Every arm starts from the same model and runs the same number of optimizer steps with the same
batch (herd sft; the pruned arms see fewer distinct examples, repeated more often). The pruned
arms share one set of difficulty scores (pass@k on verifiable items, reference loss otherwise,
computed once by the first pruned arm). Each final model answers the held-out test split greedily
(herd's engine, up to --max-new tokens); per task: accuracy of the verifiable items, and for all
items the rate at which replies end with the end-of-turn token (the model learned to stop).
The claim to test (Llama 4's "lightweight SFT"): pruned-50 matches full within noise on about half
the tokens and beats random-50.

Writes OUT/results.json, OUT/table.md, OUT/pruning.png, and each arm's run directory.
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


def evaluate(run_dir: Path, test_path: Path, max_new: int, limit_per_task: int) -> dict:
    """Per task: n, accuracy on verifiable items (None if none), rate of replies ending with end-of-turn."""
    import herd
    from herd.data.chat_data import verify
    from herd.train.prune import prompt_of, sample_replies
    from herd.train.chat_rows import BadLines, load_examples

    model = herd.load_model(run_dir)
    tok = herd.load_tokenizer(run_dir)
    examples = load_examples(test_path, tok, model.config.vision, 10**6, BadLines(True))
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
    ap.add_argument("--prune-k", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=24, help="tokens per held-out reply")
    ap.add_argument("--eval-per-task", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 12 items per task, 2 steps")
    args = ap.parse_args()
    out = Path(args.out if not args.smoke or args.out != "runs/sft_pruning" else "runs/sft_pruning_smoke")
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        init, data = smoke_assets(out)
        args.steps, args.batch_size, args.eval_per_task, args.max_new, args.prune_k = 2, 2, 4, 4, 2
    else:
        if not args.init or not args.data:
            ap.error("--init and --data are required (or --smoke)")
        init, data = Path(args.init), Path(args.data)
    import torch

    from herd.train.sft import SFTConfig, sft

    if args.threads:
        torch.set_num_threads(args.threads)
    results, scores = {}, None
    for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
        prune, mode = ARMS[arm]
        run_dir = out / arm
        t0 = time.perf_counter()
        summary = sft(SFTConfig(init=str(init), data=str(data / "train.jsonl"), val_data=str(data / "val.jsonl"),
                                out=str(run_dir), max_steps=args.steps, batch_size=args.batch_size,
                                seq_len=args.seq_len, lr=args.lr, prune=prune, prune_mode=mode, prune_k=args.prune_k,
                                prune_scores=scores if mode == "model" else None, skip_bad=True, seed=args.seed,
                                progress=not args.smoke, ckpt_every=10**9, keep=1, eval_every=max(1, args.steps // 4)))
        if prune and mode == "model" and scores is None:
            scores = str(run_dir / "prune" / "scores.jsonl")
        evals = evaluate(run_dir, data / "test.jsonl", args.max_new, args.eval_per_task)
        results[arm] = {"prune": prune, "mode": mode, "examples": summary.get("kept", summary.get("examples")),
                        "loss_tokens": summary["tokens"], "val_loss": summary.get("val_loss"), "tasks": evals,
                        "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"{arm}: {json.dumps(results[arm])}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = render(results)
    (out / "table.md").write_text(table)
    print(table)
    plot(results, out / "pruning.png")
    return 0


def render(results: dict) -> str:
    tasks = sorted({t for r in results.values() for t in r["tasks"]})
    head = "| arm | examples | loss tokens | val loss | " + " | ".join(f"{t} acc / eot" for t in tasks) + " |"
    lines = [head, "|" + "---|" * (4 + len(tasks))]
    for arm, r in results.items():
        cells = []
        for t in tasks:
            e = r["tasks"].get(t)
            acc = "–" if not e or e["accuracy"] is None else f"{e['accuracy']:.2f}"
            cells.append(f"{acc} / {e['eot_rate']:.2f}" if e else "–")
        val = "–" if r["val_loss"] is None else f"{r['val_loss']:.3f}"
        lines.append(f"| {arm} | {r['examples']} | {r['loss_tokens']:,} | {val} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = sorted({t for r in results.values() for t, e in r["tasks"].items() if e["accuracy"] is not None})
    if not tasks:
        return
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 3, 3.8), dpi=110)
    w = 0.8 / max(len(results), 1)
    for i, (arm, r) in enumerate(results.items()):
        vals = [r["tasks"].get(t, {}).get("accuracy") or 0.0 for t in tasks]
        ax.bar(np.arange(len(tasks)) + i * w, vals, w, label=f"{arm} ({r['loss_tokens']:,} tok)")
    ax.set_xticks(np.arange(len(tasks)) + w * (len(results) - 1) / 2, tasks, fontsize=8)
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title("SFT at equal steps: full vs model-pruned vs random subsets")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
