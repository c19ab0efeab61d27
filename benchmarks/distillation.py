"""Codistillation: does a larger teacher make the tiny student better at equal student compute?

A teacher (the tiny recipe made wider and deeper, `--teacher-width/--teacher-layers`: same
vocabulary, tokenizer and vision tower as the student, which distillation needs; the `small`
preset has another vocabulary) is pre-trained on the bundled data. Then the `tiny` student is
trained twice per seed on the same data for the same number of steps: (a) alone, on the data's
next tokens, and (b) distilled (`herd train --teacher`), online teacher forwards each step with
the default gap-driven weight. Reported per run: validation loss (plain cross-entropy on the
fixed validation set, the same for every run), held-out digit accuracy, and compute: the
student's training FLOPs (6 · active params · tokens) and the teacher's forward FLOPs
(2 · active params · tokens; the same teacher work an offline precompute does once). A third arm
trains the student alone for as many more steps as the teacher's forwards cost (same total
compute, the teacher's own pre-training not counted: it is paid once for all its students).

    python benchmarks/distillation.py [--steps 300] [--teacher-steps 600] [--seeds 0 1] [--jobs 4] [--out runs/bench_distill]
Writes OUT/distillation.json, OUT/distillation.md (the table) and OUT/distillation.png; finished
runs are reused, so an interrupted benchmark resumes. The peer of each distilled run is the run
alone with the same seed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from _runs import run, shared_assets
from common import machine, markdown_table, setup_threads


def _finished(out: Path, steps: int) -> list[dict] | None:
    s = out / "summary.json"
    if s.exists() and json.loads(s.read_text()).get("step") == steps:
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return None


def one(out: Path, assets: dict, **kw) -> list[dict]:
    return _finished(out, kw["max_steps"]) or run(out, assets, **kw)


def flops(width: int | None, layers: int | None, tokens: int, factor: int) -> float:
    from herd.params import count_params
    from herd.presets import scaled_tiny

    return factor * count_params(scaled_tiny(width or 256, layers or 4))["active"] * tokens


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    colors = {"alone": "#1f77b4", "distilled": "#d62728", "alone_matched": "#7f7f7f"}
    for name, runs in results["runs"].items():
        for seed, rows in runs.items():
            va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
            ax.plot(*zip(*va), "o-", ms=3, color=colors[name], alpha=0.8, label=f"tiny {name} (seed {seed})")
    t = results["teacher"]
    ax.axhline(t["val_loss"], ls="--", color="gray", label=f"teacher ({t['params_active'] / 1e6:.0f}M active)")
    ax.set_xlabel("student step")
    ax.set_ylabel("validation cross-entropy (nats/token)")
    ax.set_title("tiny student: alone vs distilled from a wider teacher")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="student steps (both arms)")
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--teacher-width", type=int, default=512)
    ap.add_argument("--teacher-layers", type=int, default=6)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--weight", default="gap", help="--distill-weight of the distilled arm")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--topk", type=int, default=None, help="--teacher-topk of the distilled arm")
    ap.add_argument("--max-docs", type=int, default=None, help="smoke runs: first N documents per source")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=1, help="student runs in parallel (each with HERD_THREADS threads)")
    ap.add_argument("--out", default="runs/bench_distill")
    args = ap.parse_args()
    threads = setup_threads()
    print(f"machine: {machine()}")
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    assets = shared_assets(root)
    common = dict(batch_size=args.batch, seq_len=args.seq, eval_every=args.eval_every, eval_batches=8,
                  max_docs=args.max_docs, threads=threads)

    tdir = root / "teacher"
    trows = one(tdir, assets, width=args.teacher_width, layers=args.teacher_layers, max_steps=args.teacher_steps,
                seed=100, **common)
    tokens_per_step = args.batch * args.seq  # upper bound: every position (a few are padding / -100)
    teacher = {"width": args.teacher_width, "layers": args.teacher_layers, "steps": args.teacher_steps,
               "val_loss": trows[-1]["val_loss"], "digit_acc": trows[-1].get("digit_acc"),
               "params_active": flops(args.teacher_width, args.teacher_layers, 1, 1),
               "train_tflop": flops(args.teacher_width, args.teacher_layers, tokens_per_step * args.teacher_steps, 6) / 1e12}
    print(f"teacher: val {teacher['val_loss']:.4f}, digits {teacher['digit_acc']}")

    student_tf = flops(None, None, tokens_per_step * args.steps, 6) / 1e12
    teacher_fwd_tf = flops(args.teacher_width, args.teacher_layers, tokens_per_step * args.steps, 2) / 1e12
    matched = round(args.steps * (student_tf + teacher_fwd_tf) / student_tf)  # alone, same total compute
    runs: dict = {"alone": {}, "distilled": {}, "alone_matched": {}}
    steps = {"alone": args.steps, "distilled": args.steps, "alone_matched": matched}
    dirs = {"alone": "alone", "distilled": "distilled", "alone_matched": f"alone{matched}"}
    distill = dict(teacher=str(tdir), distill_weight=args.weight, distill_temperature=args.temperature,
                   teacher_topk=args.topk)
    jobs = {(name, seed): (root / f"{dirs[name]}_s{seed}", dict(max_steps=steps[name], seed=seed, **common,
                                                                **(distill if name == "distilled" else {})))
            for seed in args.seeds for name in runs}
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(one, out, assets, **kw): key for key, (out, kw) in jobs.items()}
        for f in as_completed(futures):
            name, seed = futures[f]
            runs[name][seed] = f.result()
            print(f"{name} seed {seed}: val {runs[name][seed][-1]['val_loss']:.4f}")
    runs = {name: dict(sorted(r.items())) for name, r in runs.items()}

    table, summary = [], {}
    labels = {"alone": "tiny alone", "distilled": "tiny distilled", "alone_matched": "tiny alone, same total compute"}
    for name, per_seed in runs.items():
        vals = [rows[-1]["val_loss"] for rows in per_seed.values()]
        accs = [rows[-1].get("digit_acc", float("nan")) for rows in per_seed.values()]
        extra = teacher_fwd_tf if name == "distilled" else 0.0
        own = student_tf * steps[name] / args.steps
        summary[name] = {"steps": steps[name], "val_loss": vals, "digit_acc": accs, "student_tflop": own,
                         "teacher_tflop": extra}
        table.append([labels[name], steps[name], len(vals), f"{statistics.mean(vals):.4f}",
                      " / ".join(f"{v:.4f}" for v in vals), f"{statistics.mean(accs):.3f}",
                      " / ".join(f"{a:.3f}" for a in accs), f"{own:.2f}", f"{extra:.2f}"])
    header = ["run", "student steps", "seeds", "val loss (mean)", "val loss per seed", "digit acc (mean)",
              "digit acc per seed", "student TFLOP", "teacher fwd TFLOP"]
    md = markdown_table(header, table)
    md += (f"\n\nTeacher: tiny recipe at width {args.teacher_width}, {args.teacher_layers} layers "
           f"({teacher['params_active'] / 1e6:.1f}M active), {args.teacher_steps} steps "
           f"({teacher['train_tflop']:.2f} TFLOP, once): val loss {teacher['val_loss']:.4f}, digit acc "
           f"{teacher['digit_acc']}. Students: {args.steps} steps × {args.batch}×{args.seq} tokens; distilled with "
           f"--distill-weight {args.weight} --distill-temperature {args.temperature:g}"
           + (f" --teacher-topk {args.topk}" if args.topk else "") + f". Machine: {machine()}.\n")
    print(md)
    gain = [a - d for a, d in zip(summary["alone"]["val_loss"], summary["distilled"]["val_loss"])]
    print(f"val-loss gain of distillation per seed: {', '.join(f'{g:+.4f}' for g in gain)}")
    results = {"teacher": teacher, "summary": summary, "gain_per_seed": gain, "args": vars(args), "runs": runs}
    (root / "distillation.json").write_text(json.dumps(results, indent=1) + "\n")
    (root / "distillation.md").write_text(md)
    plot(results, root / "distillation.png")
    print(f"wrote {root}/distillation.json, .md, .png")


if __name__ == "__main__":
    main()
