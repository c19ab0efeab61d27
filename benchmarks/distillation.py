"""Codistillation: does a stronger teacher make the tiny student better at equal student compute?

The teacher is either trained here (the tiny recipe made wider and deeper,
`--teacher-width/--teacher-layers`; the `small` preset has another vocabulary) or an existing
model directory (`--teacher-dir`, e.g. runs/speedrun/base, the tiny preset trained 600 steps):
distillation needs the student's vocabulary and tokenizer, so the students use the teacher's
tokenizer. The `tiny` student is then trained per seed on the same data for the same number of
steps: (a) alone, on the data's next tokens, and (b) distilled (`herd train --teacher`), online
teacher forwards each step with the default gap-driven weight. Reported per run: validation loss
(plain cross-entropy on the fixed validation set, the same for every run: herd.data draws it with
its own seed) and held-out digit accuracy. Compute: the student's training FLOPs (6 · active
params · tokens) and the teacher's forward FLOPs (2 · active params · tokens). Two ways to pay
for the teacher's forwards:
  * online: every distilled student pays them; the arm `alone_matched` trains the student alone
    for as many more steps as they cost (same total compute; the teacher's own pre-training is
    not counted: it is paid once for all its students);
  * offline (`--teacher-targets`): the same forwards run once per data stream and are shared by
    every student trained on it, so a student's share is precompute / students. `--offline-topk K`
    also runs that arm (top-K targets, precomputed on first use) for `--offline-seeds`.

    python benchmarks/distillation.py --teacher-dir runs/speedrun/base --steps 300 --seeds 0 1 [--publish]
    python benchmarks/distillation.py --teacher-dir runs/speedrun/base --steps 60 --stop-after 30 ...  # short budget
    python benchmarks/distillation.py [--steps 300] [--teacher-steps 600] [--seeds 0 1] [--jobs 4] [--out runs/bench_distill]
Writes OUT/distillation.json (report-card format: {"claim": {"pass", "margin", "smoke"}, "commit",
...}), OUT/distillation.md (the table) and OUT/distillation.png; `--publish` copies the json and
png to benchmarks/results/. Finished runs are reused, so an interrupted benchmark resumes.
The claim passes when the distilled student's validation loss is below the student's alone on
every seed and the mean margin exceeds the two arms' seed spreads.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import subprocess
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
    return _finished(out, kw.get("stop_after") or kw["max_steps"]) or run(out, assets, **kw)


def active_params(config) -> int:
    from herd.params import count_params

    return count_params(config)["active"]


def teacher_val_loss(tdir: Path, args) -> float:
    """The teacher's loss on the students' validation set (same settings as theirs, bf16 as they run)."""
    from herd.train.distributed import DistEnv
    from herd.train.loop import init_from, validation_loss
    from herd.train.trainer import NextTokenLoss, TrainConfig, build_data

    model, tok = init_from(tdir)
    cfg = TrainConfig(seq_len=args.seq, batch_size=args.batch, eval_batches=8, max_docs=args.max_docs, progress=False)
    env = DistEnv()
    _, val = build_data(cfg, tok, model.config, env)
    return validation_loss(NextTokenLoss(env.device, tok.bos_id), val, env, cfg)(model)["val_loss"]


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    colors = {"alone": "#1f77b4", "distilled": "#d62728", "alone_matched": "#7f7f7f", "distilled_offline": "#ff7f0e"}
    t = results["teacher"]
    for ax, key, label in ((axes[0], "val_loss", "validation cross-entropy (nats/token)"),
                           (axes[1], "digit_acc", "held-out digit accuracy (chance 0.1)")):
        for name, runs in results["runs"].items():
            for seed, rows in runs.items():
                pts = [(r["step"], r[key]) for r in rows if key in r]
                if pts:
                    ax.plot(*zip(*pts), "o-", ms=3, color=colors[name], alpha=0.8, label=f"tiny {name} (seed {seed})")
        if t.get(key) is not None:
            ax.axhline(t[key], ls="--", color="gray", label=f"teacher ({t['params_active'] / 1e6:.1f}M active)")
        ax.set_xlabel("student step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("tiny student: alone vs distilled from a stronger teacher")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="student steps (both arms)")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop the student arms at this step of the --steps schedule (the same-compute arm "
                         "proportionally later): a shorter budget on the same learning-rate schedule")
    ap.add_argument("--teacher-dir", default=None,
                    help="reuse this trained model directory as the teacher (its tokenizer becomes the students')")
    ap.add_argument("--teacher-steps", type=int, default=600, help="teacher trained here: steps")
    ap.add_argument("--teacher-width", type=int, default=512)
    ap.add_argument("--teacher-layers", type=int, default=6)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--weight", default="gap", help="--distill-weight of the distilled arm")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--topk", type=int, default=None, help="--teacher-topk of the (online) distilled arm")
    ap.add_argument("--offline-topk", type=int, default=None, help="also run the offline-targets arm with top-K")
    ap.add_argument("--offline-seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--arms", nargs="+", default=["alone", "distilled", "alone_matched"],
                    choices=["alone", "distilled", "alone_matched"], help="which arms to run and tabulate")
    ap.add_argument("--max-docs", type=int, default=None, help="smoke runs: first N documents per source")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=1, help="student runs in parallel (each with HERD_THREADS threads)")
    ap.add_argument("--out", default="runs/bench_distill")
    ap.add_argument("--publish", action="store_true", help="copy the json and png to benchmarks/results/")
    args = ap.parse_args()
    threads = setup_threads()
    print(f"machine: {machine()}")
    import herd
    from herd.config import load_config
    from herd.presets import scaled_tiny

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    common = dict(batch_size=args.batch, seq_len=args.seq, eval_every=args.eval_every, eval_batches=8,
                  max_docs=args.max_docs, threads=threads)
    tokens_per_step = args.batch * args.seq  # upper bound: every position (a few are padding / -100)
    if args.teacher_dir:  # a trained model: the students share its tokenizer and the default data cache
        tdir = Path(args.teacher_dir)
        assets = {"tokenizer": str(tdir), "data_cache": None}
        tsum = json.loads((tdir / "summary.json").read_text())
        tconfig = load_config(tdir / "config.json")
        teacher = {"dir": str(tdir), "steps": tsum["step"], "val_loss": round(teacher_val_loss(tdir, args), 5),
                   "digit_acc": tsum.get("digit_acc"), "width": tconfig.text.hidden_size,
                   "layers": tconfig.text.num_hidden_layers, "note": "digit_acc from the teacher's own run summary",
                   "tokens": tsum.get("tokens")}
    else:
        assets = shared_assets(root)
        tdir = root / "teacher"
        tconfig = scaled_tiny(args.teacher_width, args.teacher_layers)
        trows = one(tdir, assets, width=args.teacher_width, layers=args.teacher_layers, max_steps=args.teacher_steps,
                    seed=100, **common)
        teacher = {"dir": str(tdir), "width": args.teacher_width, "layers": args.teacher_layers,
                   "steps": args.teacher_steps, "val_loss": trows[-1]["val_loss"], "digit_acc": trows[-1].get("digit_acc"),
                   "tokens": tokens_per_step * args.teacher_steps}
    teacher["params_active"] = active_params(tconfig)
    teacher["train_tflop"] = 6 * teacher["params_active"] * (teacher.get("tokens") or 0) / 1e12
    print(f"teacher {tdir}: val {teacher['val_loss']}, digits {teacher['digit_acc']}")

    student_active = active_params(herd.get_config("tiny"))
    trained = args.stop_after or args.steps  # student steps actually taken
    student_tf = 6 * student_active * tokens_per_step * trained / 1e12
    teacher_fwd_tf = 2 * teacher["params_active"] * tokens_per_step * trained / 1e12
    matched = round(trained * (student_tf + teacher_fwd_tf) / student_tf)  # alone, same total compute
    steps = {name: n for name, n in {"alone": trained, "distilled": trained, "alone_matched": matched}.items()
             if name in args.arms}
    cut = f"_to{trained}of{args.steps}" if args.stop_after else ""
    dirs = {"alone": f"alone{cut}", "distilled": f"distilled{cut}",
            "alone_matched": f"alone_to{matched}of{args.steps}" if args.stop_after else f"alone{matched}"}
    if args.stop_after and matched > args.steps:
        raise ValueError(f"the same-compute arm needs {matched} steps, beyond --steps {args.steps}")

    def schedule(n: int) -> dict:  # max_steps (the schedule), where to stop, and an evaluation at the stop
        if not args.stop_after:
            return dict(max_steps=n)
        return dict(max_steps=args.steps, stop_after=n, **({} if n % args.eval_every == 0 else {"eval_every": n}))
    distill = dict(teacher=str(tdir), distill_weight=args.weight, distill_temperature=args.temperature,
                   teacher_topk=args.topk)
    jobs = {(name, seed): (root / f"{dirs[name]}_s{seed}", dict(**{**common, **schedule(steps[name])}, seed=seed,
                                                                **(distill if name == "distilled" else {})))
            for name in steps for seed in args.seeds}
    if args.offline_topk:
        steps["distilled_offline"] = trained
        for seed in args.offline_seeds:
            jobs[("distilled_offline", seed)] = (
                root / f"distilled_offline{args.offline_topk}{cut}_s{seed}",
                dict(**{**common, **schedule(trained)}, seed=seed, **{**distill, "teacher_topk": args.offline_topk},
                     teacher_targets=str(root / f"targets_top{args.offline_topk}_s{seed}")))
    runs: dict = {name: {} for name in steps}
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(one, out, assets, **kw): key for key, (out, kw) in jobs.items()}
        for f in as_completed(futures):
            name, seed = futures[f]
            runs[name][seed] = f.result()
            print(f"{name} seed {seed}: val {runs[name][seed][-1]['val_loss']:.4f}")
    runs = {name: dict(sorted(r.items())) for name, r in runs.items()}

    table, summary = [], {}
    labels = {"alone": "tiny alone", "distilled": "tiny distilled (online)",
              "alone_matched": "tiny alone, same total compute as online",
              "distilled_offline": f"tiny distilled (offline top-{args.offline_topk})"}
    for name, per_seed in runs.items():
        vals = [rows[-1]["val_loss"] for rows in per_seed.values()]
        accs = [rows[-1].get("digit_acc", float("nan")) for rows in per_seed.values()]
        own = student_tf * steps[name] / trained
        extra = {"distilled": f"{teacher_fwd_tf:.2f} (every student)",
                 "distilled_offline": f"{teacher_fwd_tf:.2f} once per data stream"}.get(name, "0")
        summary[name] = {"steps": steps[name], "seeds": list(per_seed), "val_loss": vals, "digit_acc": accs,
                         "student_tflop": own,
                         "teacher_tflop": teacher_fwd_tf if name.startswith("distilled") else 0.0,
                         "val_loss_mean": statistics.fmean(vals),
                         "val_loss_spread": (max(vals) - min(vals)) / 2, "digit_acc_mean": statistics.fmean(accs)}
        table.append([labels[name], steps[name], len(vals), f"{statistics.mean(vals):.4f}",
                      " / ".join(f"{v:.4f}" for v in vals), f"{statistics.mean(accs):.3f}",
                      " / ".join(f"{a:.3f}" for a in accs), f"{own:.2f}", extra])
    header = ["run", "student steps", "seeds", "val loss (mean)", "val loss per seed", "digit acc (mean)",
              "digit acc per seed", "student TFLOP", "teacher fwd TFLOP"]
    md = markdown_table(header, table)
    md += (f"\n\nTeacher: {tdir} (width {teacher['width']}, {teacher['layers']} layers, "
           f"{teacher['params_active'] / 1e6:.1f}M active, {teacher['steps']} steps, {teacher['train_tflop']:.1f} TFLOP "
           f"once): val loss {teacher['val_loss']}, digit acc {teacher['digit_acc']}. Students: tiny "
           f"({student_active / 1e6:.1f}M active), {trained} steps"
           + (f" (stopped there on a {args.steps}-step schedule)" if args.stop_after else "")
           + f" × {args.batch}×{args.seq} tokens; distilled with "
           f"--distill-weight {args.weight} --distill-temperature {args.temperature:g}"
           + (f" --teacher-topk {args.topk}" if args.topk else "") + f". Machine: {machine()}.\n")
    print(md)
    alone, dist = summary["alone"], summary["distilled"]
    gain = [a - d for a, d in zip(alone["val_loss"], dist["val_loss"])]
    margin = alone["val_loss_mean"] - dist["val_loss_mean"]
    matched_margin = summary["alone_matched"]["val_loss_mean"] - dist["val_loss_mean"] if "alone_matched" in summary \
        else None
    smoke = args.max_docs is not None or len(args.seeds) < 2
    claim = {"name": "the distilled student beats the student trained alone at equal student compute",
             "threshold": "alone val loss − distilled val loss > 0 on every seed and > both arms' seed spreads",
             "margin": margin, "pass": all(g > 0 for g in gain) and margin > alone["val_loss_spread"] + dist[
                 "val_loss_spread"] and len(args.seeds) > 1, "smoke": smoke,
             "digit_acc_margin": dist["digit_acc_mean"] - alone["digit_acc_mean"],
             "margin_at_equal_total_compute_online": matched_margin}
    compute = {"student_tflop": student_tf, "teacher_forward_tflop": teacher_fwd_tf,
               "online_total_tflop_per_student": student_tf + teacher_fwd_tf,
               "offline_precompute_tflop_once": teacher_fwd_tf,
               "offline_total_tflop_per_student": {str(n): student_tf + teacher_fwd_tf / n for n in (1, 2, 4, 8)},
               "offline_targets_bytes": tokens_per_step * trained * (args.offline_topk or 64) * 6,
               "note": "offline: the same teacher forwards run once per data stream; n students sharing them pay "
                       "student + precompute / n (top-K storage: K × (2-byte id + 4-byte log-prob) per token)"}
    print(f"val-loss gain of distillation per seed: {', '.join(f'{g:+.4f}' for g in gain)}; "
          f"claim {'PASS' if claim['pass'] else 'FAIL'} (margin {margin:+.4f}, smoke {smoke})")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = {"claim": claim, "commit": commit, "machine": machine(), "teacher": teacher, "summary": summary,
               "compute": compute, "gain_per_seed": gain, "args": vars(args), "runs": runs}
    (root / "distillation.json").write_text(json.dumps(results, indent=1) + "\n")
    (root / "distillation.md").write_text(md)
    plot(results, root / "distillation.png")
    print(f"wrote {root}/distillation.json, .md, .png")
    if args.publish:
        dest = Path(__file__).resolve().parent / "results"
        for f in ("distillation.json", "distillation.png"):
            shutil.copy(root / f, dest / f)
        print(f"published to {dest}")


if __name__ == "__main__":
    main()
