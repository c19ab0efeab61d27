"""`herd speedrun`: the whole tiny Llama 4 recipe, one stage after another, then the report card.

    herd speedrun --out runs/speedrun            # ≤ 45 min budget; 20.6 min measured idle for the 20 stages
                                                 # before the 6 evaluation stages (6.7 min on a shared machine)
    herd speedrun --out runs/quick --quick       # every stage at toy size (minutes): the pipeline runs
    herd speedrun --out runs/speedrun --serve    # then `herd serve` on the final model
    herd report runs/speedrun                    # rebuild report.md / report.json from the directories

Like nanochat's runs/speedrun.sh, the speedrun is a flat list of stage commands (STAGES). Each is
a `herd` subcommand that reads one run directory and writes one, so any stage can be rerun on its
own with the command the log prints:

    tokenizer → base (herd train) → mid (herd midtrain) → sft data → sft (pruned) → rl → dpo pairs
    → dpo → prompt guard → llama guard → per model: lm-eval (herd's offline tasks), RULER and the
    chat skills (herd eval skills: digit VQA, tool use, stop rate; raw prompts for BASE and MID, the
    chat format for SFT, RL, DPO) → the use cases scored on the final model (herd score-usecases)
    → report

OUT/speedrun.json records, per stage, its command, status, wall-clock seconds and log file
(OUT/logs/STAGE.log). A stage that finished is skipped on rerun; one that was interrupted or
failed runs again, with --resume where its command has one (the shared trainer's checkpoints make
that exact). A training stage starts from the newest model stage that finished, so a failed
mid-training leaves SFT starting from the base model, and the report says which stage is missing;
when the missing stage finishes on a later run, the stages after it start over from it.
A stage whose subcommand is not part of this herd is recorded as "not available", never faked.
OUT/environment.json (commit, hardware, versions, code size) is written once at the start, so the
report (herd/evals/report.py) is a pure function of OUT.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MODEL_STAGES = ("base", "mid", "sft", "rl", "dpo")  # the report's columns, in order

# Stage sizes. FULL: the ≤45-minute budget on 2 cores; QUICK: every stage at toy size.
FULL = dict(base=["--max-steps", "600", "--align-start", "150", "--align-steps", "50", "--bias-rate", "0.01",
                  "--vision-lr-mult", "0", "--align-freeze", "none"],  # make train's recipe (Makefile TRAIN_ARGS)
            mid=["--max-steps", "60", "--curriculum", "512:0.5,2048:0.5"],
            sft_data=["--per-task", "200"], sft=["--max-steps", "150", "--prune", "0.5", "--seq-len", "512", "--skip-bad"],
            rl=["--max-steps", "30", "--workers", "1"], pairs=["--limit", "128", "--use-reference"],
            dpo=["--max-steps", "60"], pg=[], lg=["--max-steps", "400"],  # 200 left the verdict at the prior in one of two runs
            ruler=["--tasks", "niah_single_1,niah_multikey_1", "--lengths", "512,2k", "--samples", "10"],
            lm=["--limit", "100"], skills=["--limit", "40"], usecases=["--limit", "20", "--lengths", "1024,2048"])
QUICK = dict(base=["--max-steps", "4", "--batch-size", "2", "--seq-len", "64", "--max-docs", "10",
                   "--eval-every", "2", "--eval-batches", "1"],
             mid=["--max-steps", "2", "--curriculum", "512:1", "--batch-tokens", "512", "--max-docs", "10",
                  "--eval-every", "2", "--eval-batches", "1"],
             sft_data=["--per-task", "6", "--tasks", "chain_sum,letter_counting,calculator,ask_repo,summarize"],
             sft=["--max-steps", "2", "--batch-size", "2", "--seq-len", "512", "--prune", "0.5", "--prune-k", "1",
                  "--prune-max-new", "4", "--eval-every", "2", "--eval-batches", "1"],
             rl=["--max-steps", "1", "--workers", "0", "--group-size", "2", "--prompts-per-step", "2",
                 "--max-new-tokens", "8", "--per-task", "4", "--eval-prompts", "2"],
             pairs=["--limit", "4", "--k", "2", "--max-new", "4", "--use-reference"],
             dpo=["--max-steps", "2", "--batch-size", "2", "--max-len", "128"],
             pg=[], lg=["--max-steps", "2", "--eval-limit", "4"],
             ruler=["--tasks", "niah_single_1", "--lengths", "512", "--samples", "2", "--max-new-tokens", "12"],
             lm=["--limit", "2"], skills=["--limit", "2"],
             usecases=["--limit", "1", "--lengths", "256,512", "--max-new-tokens", "8"])
CHAT_STAGES = ("sft", "rl", "dpo")  # chat-format prompts in the evaluations; base and mid get raw text


@dataclass
class Stage:
    name: str
    argv: list[str]  # after `herd` (or a full python -m command when module is set)
    out: str  # the directory it writes, relative to OUT
    needs_model: bool = False  # argv gets --init <newest finished model stage>
    model: bool = False  # writes a model directory (a report column)
    module: str | None = None  # run as `python -m module` instead of a herd subcommand
    reads: str | None = None  # an evaluation: the model directory (relative to OUT) it needs


def stages(out: Path, sizes: dict) -> list[Stage]:
    o = str(out)
    s = [Stage("tokenizer", ["tokenizer", "train", "--vocab-size", "8192", "--out", f"{o}/tokenizer"], "tokenizer"),
         Stage("base", ["train", "--preset", "tiny", "--tokenizer", f"{o}/tokenizer", "--resume", "--out",
                        f"{o}/base", *sizes["base"]], "base", model=True),
         Stage("mid", ["midtrain", "--resume", "--out", f"{o}/mid", *sizes["mid"]], "mid", True, True),
         Stage("sft_data", ["data", "sft", "--tokenizer", f"{o}/tokenizer", "--out", f"{o}/sft_data",
                            *sizes["sft_data"]], "sft_data"),
         Stage("sft", ["sft", "--data", f"{o}/sft_data/train.jsonl", "--resume", "--out", f"{o}/sft", *sizes["sft"]],
               "sft", True, True),
         Stage("rl", ["rl", "--resume", "--out", f"{o}/rl", *sizes["rl"]], "rl", True, True),
         Stage("dpo_pairs", ["dpo", "pairs", "--data", f"{o}/sft_data/train.jsonl", "--out", f"{o}/dpo_pairs",
                             *sizes["pairs"]], "dpo_pairs", True),
         Stage("dpo", ["dpo", "--data", f"{o}/dpo_pairs/pairs.jsonl", "--resume", "--out", f"{o}/dpo",
                       *sizes["dpo"]], "dpo", True, True),
         Stage("prompt_guard", ["guard", "train-prompt", "--out", f"{o}/prompt_guard", *sizes["pg"]], "prompt_guard"),
         Stage("llama_guard", ["guard", "train-llama", "--resume", "--out", f"{o}/llama_guard", *sizes["lg"]],
               "llama_guard")]
    for m in MODEL_STAGES:
        s.append(Stage(f"lm_eval_{m}", ["run", "--model", "herd", "--model_args", f"pretrained={o}/{m}",
                                         "--tasks", "herd", "--output_path", f"{o}/{m}/lm_eval", *sizes["lm"]],
                       f"{m}/lm_eval", module="herd.evals.lm_eval_adapter", reads=m))
        s.append(Stage(f"ruler_{m}", ["eval", "ruler", f"{o}/{m}", "--out", f"{o}/{m}/ruler", *sizes["ruler"]],
                       f"{m}/ruler", reads=m))
        s.append(Stage(f"skills_{m}", ["eval", "skills", f"{o}/{m}", "--format", "chat" if m in CHAT_STAGES else "raw",
                                        "--out", f"{o}/{m}/skills", *sizes["skills"]], f"{m}/skills", reads=m))
    s.append(Stage("usecases", ["score-usecases", f"{o}/{MODEL_STAGES[-1]}", "--out", f"{o}/usecases",
                                *sizes["usecases"]], "usecases", reads=MODEL_STAGES[-1]))
    return s


# ----- facts about the environment, taken once (the report reads them from OUT) -----------------------
def _git_commit(root: Path) -> str:
    """HEAD's commit read from .git (no subprocess): a ref file or packed-refs."""
    git = root / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()[:12]
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:12]
    except OSError:
        pass
    return "unknown"


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    pkg = Path(__file__).resolve().parent  # the herd package
    cpu, cores = platform.processor() or platform.machine(), os.cpu_count()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for dist in ("torch", "transformers", "lm_eval", "tokenizers"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = "not installed"
    files = sorted(pkg.rglob("*.py"))
    return {"commit": _git_commit(pkg.parent), "cpu": cpu, "cores": cores, "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions, "code_files": len(files),
            "code_lines": sum(len(f.read_text(errors="replace").splitlines()) for f in files)}


# ----- running ------------------------------------------------------------------------------------------
def available(argv: list[str]) -> bool:
    """Whether `herd ARGV[0] [ARGV[1]]` names a subcommand of this herd (asked of `herd … --help`
    in a child process, so this module does not import the CLI that imports it)."""
    words = [a for a in argv[:2] if not a.startswith("-")]
    cmd = [sys.executable, "-m", "herd", *words, "--help"]
    return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def _load_state(out: Path) -> dict:
    p = out / "speedrun.json"
    return json.loads(p.read_text()) if p.exists() else {"stages": {}}


def _save_state(out: Path, state: dict) -> None:
    tmp = out / "speedrun.json.tmp"
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, out / "speedrun.json")


def run_stage(stage: Stage, out: Path, state: dict, init: str | None) -> dict:
    if stage.module:
        cmd = [sys.executable, "-m", stage.module, *stage.argv]
    else:
        if not available(stage.argv):
            return {"status": "not available", "cmd": "herd " + " ".join(stage.argv)}
        cmd = [sys.executable, "-m", "herd", *stage.argv]
    if stage.needs_model:
        if init is None:
            return {"status": "skipped", "reason": "no finished model stage to start from"}
        cmd += ["--init", init]
    if stage.reads and not (out / stage.reads / "config.json").exists():
        return {"status": "skipped", "reason": f"{stage.reads} has no model"}
    log = out / "logs" / f"{stage.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = round(time.perf_counter() - t0, 1) + state.get("wall_s", 0.0)  # an interrupted stage's earlier time
    shown = ["python", *cmd[1:]] if stage.module else ["herd", *cmd[3:]]
    return {"status": "done" if rc == 0 else "failed", "rc": rc, "wall_s": round(wall, 1), "cmd": " ".join(shown),
            "log": str(log.relative_to(out))}


def speedrun(out: str | Path, quick: bool = False, progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "environment.json").exists():
        (out / "environment.json").write_text(json.dumps({**environment(), "quick": quick}, indent=1) + "\n")
    state = _load_state(out)
    plan = stages(out, QUICK if quick else FULL)
    last_model: str | None = None
    for i, stage in enumerate(plan, 1):
        prev = state["stages"].get(stage.name, {})
        init = last_model if stage.needs_model else None
        if prev.get("status") == "done" and stage.needs_model and prev.get("init") != init:
            # an earlier stage finished since: this one started from an older model, so it starts over
            shutil.rmtree(out / stage.out, ignore_errors=True)
            prev = {}
        if prev.get("status") == "done":
            res = prev
            note = "done earlier, skipped"
        else:
            if progress:
                print(f"[{i}/{len(plan)}] {stage.name} ...", file=sys.stderr, flush=True)
            res = run_stage(stage, out, prev, init)
            if init is not None:
                res["init"] = init
            state["stages"][stage.name] = res
            _save_state(out, state)
            note = res["status"] + (f" in {res['wall_s']} s" if "wall_s" in res else "")
            if res["status"] == "failed":
                note += f" (see {res.get('log')})"
        if progress:
            print(f"[{i}/{len(plan)}] {stage.name}: {note}", file=sys.stderr, flush=True)
        if stage.model and res.get("status") == "done":
            last_model = str(out / stage.out)
    from herd.evals.report import write_report

    write_report(out)
    return state


def _cmd_speedrun(args) -> int:
    state = speedrun(args.out, quick=args.quick)
    print(f"report: {Path(args.out) / 'report.md'}")
    if args.serve:
        final = next((Path(args.out) / m for m in reversed(MODEL_STAGES)
                      if state["stages"].get(m, {}).get("status") == "done"), None)
        if final is None:
            raise ValueError("no model stage finished; nothing to serve")
        cmd = [sys.executable, "-m", "herd", "serve", str(final)]
        guards = Path(args.out) / "guards.json"
        if guards.exists():
            cmd += ["--guards", str(guards)]
        return subprocess.run(cmd).returncode
    return 0


def _cmd_report(args) -> int:
    from herd.evals.report import write_report

    if not Path(args.dir).is_dir():
        raise FileNotFoundError(f"speedrun directory not found: {args.dir}")
    md = write_report(args.dir)
    print(md)
    return 0


def add_speedrun_subcommands(sub) -> None:
    p = sub.add_parser("speedrun", help="the whole recipe: tokenizer → pre-train → … → DPO → guards → evals → report",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/speedrun", help="run directory (default runs/speedrun)")
    p.add_argument("--quick", action="store_true", help="every stage at toy size (the pipeline check)")
    p.add_argument("--serve", action="store_true", help="then serve the final model (herd serve)")
    p.set_defaults(func=_cmd_speedrun)
    p = sub.add_parser("report", help="rebuild a speedrun's report card (report.md, report.json) from its directory")
    p.add_argument("dir", help="speedrun directory")
    p.set_defaults(func=_cmd_report)
