"""`make train` over several seeds: the headline figures as mean ± spread, with the machine named.

One run of the tiny pre-training is not a figure. The seed sets the initial weights and the order
of the data, and the digit pathway in particular switches on late and at a time that varies from
seed to seed (and from CPU to CPU: the same seed took 0.655 of held-out digits on an Intel Xeon
and 0.29 on an AMD EPYC, issue 18), so README and BENCHMARKS quote the mean, the standard
deviation, the range and how many seeds clear a stated floor.

    python benchmarks/train_seeds.py [--seeds 0 1 2 3 4] [--jobs 2] [--floor 0.5] [--out runs/train_seeds]
    python benchmarks/train_seeds.py --extra "--max-steps 900" --out runs/train_seeds_900   # a candidate recipe
    python benchmarks/train_seeds.py --collect DIR [DIR ...]     # only tabulate finished runs

Each run is `herd train $(TRAIN_ARGS) $EXTRA --seed S --threads T --out OUT/seed_S`, with
TRAIN_ARGS read from the Makefile (the recipe `make train` runs; a flag in --extra overrides it),
`--jobs` runs at a time, each on cores ÷ jobs threads (never more threads than cores:
oversubscription makes a step up to 40× slower — which changes the time, not the losses). A run
that already finished is reused, so the sweep resumes. Writes OUT/train_seeds.json and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import cpu_model  # benchmarks/common.py: lscpu, else /proc/cpuinfo

ROOT = Path(__file__).resolve().parent.parent


def make_train_args() -> list[str]:
    """TRAIN_ARGS from the Makefile, without its --out."""
    m = re.search(r"^TRAIN_ARGS\s*\?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    if m is None:
        raise SystemExit("no TRAIN_ARGS line in the Makefile")
    args = shlex.split(m.group(1))
    if "--out" in args:
        i = args.index("--out")
        del args[i:i + 2]
    return args


def rows_of(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def finished(run_dir: Path, steps: int | None) -> bool:
    rows = rows_of(run_dir)
    return bool(rows) and "val_loss" in rows[-1] and (steps is None or rows[-1]["step"] == steps)


def one_run(out: Path, seed: int, args: list[str], threads: int, steps: int | None) -> Path:
    run_dir = out / f"seed_{seed}"
    if finished(run_dir, steps):
        return run_dir
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "herd", "train", *args, "--seed", str(seed), "--threads", str(threads),
           "--no-progress", "--out", str(run_dir)]
    t = time.perf_counter()
    with open(out / f"seed_{seed}.log", "w") as log:
        r = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"seed {seed} failed (exit {r.returncode}): see {out}/seed_{seed}.log")
    print(f"seed {seed}: done in {time.perf_counter() - t:.0f} s", flush=True)
    return run_dir


def summarise(run_dirs: list[Path], floor: float) -> dict:
    """Per run: final validation loss and digit accuracy, the unigram baseline, and the digit curve."""
    runs = []
    for d in run_dirs:
        rows = rows_of(d)
        if not rows or "val_loss" not in rows[-1]:
            raise SystemExit(f"{d}: no finished run (metrics.jsonl without a final evaluation)")
        cfg = json.loads((d / "train_config.json").read_text()) if (d / "train_config.json").exists() else {}
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
        evals = [r for r in rows if "digit_acc" in r]
        runs.append({"dir": str(d), "seed": cfg.get("seed"), "steps": rows[-1]["step"],
                     "val_loss": rows[-1]["val_loss"], "digit_acc": rows[-1].get("digit_acc"),
                     "baseline_unigram": summary.get("baseline_unigram"),
                     "digit_curve": {r["step"]: r["digit_acc"] for r in evals}})

    def stats(key):
        xs = [r[key] for r in runs if r[key] is not None]
        if not xs:
            return None
        return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                "min": min(xs), "max": max(xs), "n": len(xs)}

    acc = [r["digit_acc"] for r in runs if r["digit_acc"] is not None]
    return {"machine": cpu_model(), "runs": runs, "val_loss": stats("val_loss"), "digit_acc": stats("digit_acc"),
            "floor": floor, "above_floor": sum(a >= floor for a in acc), "n_runs": len(runs)}


def table(res: dict) -> str:
    lines = ["| seed | steps | validation loss | held-out digit accuracy |", "|---:|---:|---:|---:|"]
    for r in sorted(res["runs"], key=lambda r: (r["seed"] is None, r["seed"])):
        lines.append(f"| {r['seed']} | {r['steps']} | {r['val_loss']:.3f} | {r['digit_acc']:.3f} |")
    v, a = res["val_loss"], res["digit_acc"]
    spread = lambda x: f"**{x['mean']:.2f} ± {x['std']:.2f}** ({x['min']:.2f}–{x['max']:.2f})"  # noqa: E731
    lines.append(f"| **mean ± std** (n = {v['n']}) | | {spread(v)} | {spread(a)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--floor", type=float, default=0.5, help="digit accuracy every seed should reach")
    ap.add_argument("--out", default="runs/train_seeds")
    ap.add_argument("--extra", default="", help="flags appended to TRAIN_ARGS (a candidate recipe)")
    ap.add_argument("--collect", nargs="+", default=None, help="tabulate these finished run directories only")
    a = ap.parse_args()
    if a.collect:
        dirs = [Path(d) for d in a.collect]
    else:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        args = make_train_args() + shlex.split(a.extra)
        steps = int(args[len(args) - 1 - args[::-1].index("--max-steps") + 1]) if "--max-steps" in args else None
        threads = max(1, (os.cpu_count() or 1) // a.jobs)
        print(f"herd train {' '.join(args)}: seeds {a.seeds}, {a.jobs} at a time, {threads} thread(s) each",
              flush=True)
        with ThreadPoolExecutor(a.jobs) as pool:
            dirs = list(pool.map(lambda s: one_run(out, s, args, threads, steps), a.seeds))
    res = summarise(dirs, a.floor)
    print(f"machine: {res['machine']}")
    print(table(res))
    print(f"{res['above_floor']} of {res['n_runs']} runs reach digit accuracy {a.floor}")
    if not a.collect:
        (Path(a.out) / "train_seeds.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
