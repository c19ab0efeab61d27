"""Online RL claims, side by side in one run: hard-prompt pool vs uniform prompts, asynchronous
(staleness 1) vs synchronous Ray workers, herd vs TRL's GRPOTrainer.

    python benchmarks/rl.py --init runs/sft --tasks chain_sum,spell_backward --steps 40 --out runs/bench_rl
    python benchmarks/rl.py --smoke        # a random tiny model, 2 steps each: checks the script runs

Runs (all from --init, same seed, G, prompts per step, completion length and rewards):
  pool      herd rl, in-process worker, staleness 0, prompts from the pass-rate pool (τ = 0.75)
  uniform   the same with --uniform (prompts drawn uniformly; zero-advantage groups still dropped)
  sync      herd rl, 2 Ray workers, --max-staleness 0
  async     herd rl, 2 Ray workers, --max-staleness 1
  trl       TRL GRPOTrainer on the same directory loaded as transformers' Llama4ForCausalLM, the same
            prompts (rendered in the Llama 4 chat format), the same reward functions (herd's are TRL
            callables), G, completion length, β = 0, for the wall-clock seconds the herd `sync` run took
Reported: held-out reward (greedy, eval/reward) per learner step and per wall second, samples/s
(completions generated ÷ wall), wall-clock to a target training reward (--target). Goals (issue
13): herd ≥ 5× TRL samples/s; async ≥ 1.3× sync samples/s; pool ≥ uniform reward per step.
Writes OUT/rl.json, OUT/rl.md and OUT/rl.png. Timings need an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rows_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def herd_run(name: str, out: Path, args, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "herd", "rl", "--init", args.init, "--tasks", args.tasks, "--out", str(out / name),
           "--max-steps", str(args.steps), "--group-size", str(args.group_size),
           "--prompts-per-step", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens),
           "--eval-every", str(max(1, args.steps // 4)), "--eval-prompts", str(args.eval_prompts),
           "--ckpt-every", str(args.steps), "--per-task", str(args.per_task), "--seed", str(args.seed),
           "--rewards", args.rewards, "--lr", str(args.lr), "--no-progress", *extra]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - t
    if r.returncode != 0:
        errs = [x for x in r.stderr.splitlines() if "rror" in x] or [f"exit {r.returncode}"]
        return {"name": name, "error": errs[-1].strip()}
    rows = rows_of(out / name)
    summary = json.loads((out / name / "summary.json").read_text())
    return {"name": name, "wall_s": round(wall, 1), "loop_s": summary["wall_s"],
            "samples": summary["total_samples"],
            "samples_per_s": round(summary["total_samples"] / summary["wall_s"], 2),
            "eval": [(r["step"], r["eval/reward"]) for r in rows if "eval/reward" in r],
            "reward": [(r["step"], r["reward"]) for r in rows], "pool": summary.get("pool")}


def time_to(run: dict, target: float, steps_wall: float) -> float | None:
    """Wall seconds until the training reward (mean of the last 3 steps) first reaches target."""
    rw = [v for _, v in run.get("reward", [])]
    for i in range(len(rw)):
        window = rw[max(0, i - 2): i + 1]
        if sum(window) / len(window) >= target:
            return round(steps_wall * (i + 1) / len(rw), 1)
    return None


TRL_SCRIPT = r'''
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(int(sys.argv[3]))
from datasets import Dataset
from transformers import Llama4ForCausalLM, PreTrainedTokenizerFast, TrainerCallback
import trl
from herd.tokenizer import load_tokenizer
from herd.train.rl.learner import load_items, prompt_ids, parse_rewards
from herd.train.rl.rewards import REWARDS
cfg = json.loads(sys.argv[1]); budget = float(sys.argv[2])
tok = load_tokenizer(cfg["init"])
items, _ = load_items(cfg["tasks"], cfg["per_task"], cfg["seed"])
rows = [{"prompt": tok.decode(prompt_ids(tok, it)), "answer": it.get("answer"), "verifier": it.get("verifier"),
         "entry": json.dumps(it.get("entry"))} for it in items]
weights = parse_rewards(cfg["rewards"])
def wrap(name):
    fn = REWARDS[name]
    def reward(prompts, completions, entry=None, **kw):
        out = fn(prompts=prompts, completions=completions, entry=[json.loads(e) for e in entry], **kw)
        return [float("nan") if v is None else v for v in out]
    reward.__name__ = name
    return reward
hf_tok = PreTrainedTokenizerFast(tokenizer_file=cfg["init"] + "/tokenizer.json", pad_token="<|finetune_right_pad|>",
                                 eos_token="<|eot|>")
model = Llama4ForCausalLM.from_pretrained(cfg["init"], torch_dtype=torch.float32)
# TRL's fused LM head reaches the backbone through model.base_model, which Llama4ForCausalLM does not
# resolve (base_model_prefix "language_model", backbone at .model): tests/train/test_dpo.py does the same
object.__setattr__(model, "language_model", model.model)
class Budget(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if time.perf_counter() - t0 > budget:
            control.should_training_stop = True
args = trl.GRPOConfig(output_dir=cfg["out"], num_generations=cfg["G"], max_completion_length=cfg["max_new"],
                      per_device_train_batch_size=cfg["G"] * cfg["P"], learning_rate=cfg["lr"], beta=0.0,
                      max_steps=cfg["max_steps"], logging_steps=1, report_to=[], use_cpu=True, bf16=False,
                      save_strategy="no", temperature=1.0, reward_weights=list(weights.values()), seed=cfg["seed"],
                      router_aux_loss_coef=0.0)  # herd rl has no router auxiliary loss either
trainer = trl.GRPOTrainer(model=model, args=args, reward_funcs=[wrap(n) for n in weights],
                          train_dataset=Dataset.from_list(rows), processing_class=hf_tok)
t0 = time.perf_counter()
trainer.train()
wall = time.perf_counter() - t0
logs = [h for h in trainer.state.log_history if "reward" in h]
print(json.dumps({"wall_s": wall, "steps": trainer.state.global_step,
                  "samples": trainer.state.global_step * cfg["G"] * cfg["P"],
                  "reward": [(i + 1, h["reward"]) for i, h in enumerate(logs)]}))
'''


def trl_run(out: Path, args, budget: float) -> dict:
    cfg = {"init": args.init, "tasks": args.tasks, "per_task": args.per_task, "seed": args.seed,
           "rewards": args.rewards,
           "out": str(out / "trl"), "G": args.group_size, "P": args.prompts, "max_new": args.max_new_tokens,
           "lr": args.lr, "max_steps": args.steps if args.smoke else 10_000}
    threads = os.environ.get("HERD_THREADS", "2")
    r = subprocess.run([args.trl_python, "-c", TRL_SCRIPT, json.dumps(cfg), str(budget), threads],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        errs = [x for x in r.stderr.splitlines() if "Error" in x or "error" in x] or [f"exit {r.returncode}"]
        return {"name": "trl", "error": errs[-1].strip()}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {"name": "trl", "wall_s": round(res["wall_s"], 1), "loop_s": round(res["wall_s"], 1),
            "samples": res["samples"], "samples_per_s": round(res["samples"] / res["wall_s"], 2),
            "reward": res["reward"], "eval": []}


def smoke_model(out: Path) -> str:
    from tests.train.conftest import chat_model_dir

    d, _ = chat_model_dir(out / "smoke_model", vision=False)
    return str(d)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", help="model directory (an SFT run's --out)")
    p.add_argument("--tasks", default="chain_sum,spell_backward")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--per-task", type=int, default=400)
    p.add_argument("--rewards", default="correctness:1,format:0.2")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.5, help="training reward for the time-to-target column")
    p.add_argument("--trl-python", default=sys.executable, help="python of the environment with trl (the oracle venv)")
    p.add_argument("--skip", default="", help="comma-separated runs to skip (pool, uniform, sync, async, trl)")
    p.add_argument("--out", default="runs/bench_rl")
    p.add_argument("--smoke", action="store_true", help="random tiny model, 2 steps per run")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.init = args.init or smoke_model(out)
        args.steps, args.group_size, args.prompts, args.max_new_tokens = 2, 4, 2, 6
        args.eval_prompts, args.per_task, args.rewards = 4, 40, "format:1"
    if not args.init:
        p.error("--init DIR is required (or --smoke)")
    skip = set(filter(None, args.skip.split(",")))
    from common import machine, markdown_table

    runs = {}
    plan = [("pool", ["--workers", "0", "--max-staleness", "0"]),
            ("uniform", ["--workers", "0", "--max-staleness", "0", "--uniform"]),
            ("sync", ["--workers", "2", "--max-staleness", "0"]),
            ("async", ["--workers", "2", "--max-staleness", "1"])]
    for name, extra in plan:
        if name not in skip:
            print(f"running {name} ...", flush=True)
            runs[name] = herd_run(name, out, args, extra + (["--constant-steps", "1000"] if args.smoke else []))
            print(json.dumps(runs[name])[:300], flush=True)
    if "trl" not in skip:
        budget = runs.get("sync", {}).get("loop_s") or 600.0
        print(f"running trl (budget {budget:.0f} s) ...", flush=True)
        runs["trl"] = trl_run(out, args, budget)
        print(json.dumps(runs["trl"])[:300], flush=True)

    table = []
    for name, r in runs.items():
        if "error" in r:
            table.append([name, "error: " + r["error"][:80], "", "", "", ""])
            continue
        final = r["eval"][-1][1] if r["eval"] else ""
        table.append([name, r["samples_per_s"], r["samples"], r["loop_s"], final, time_to(r, args.target, r["loop_s"])])
    md = [f"machine: {machine()}; load {os.getloadavg()[0]:.2f}", "",
          markdown_table(["run", "samples/s", "samples", "wall s", "held-out reward (last eval)",
                          f"s to train reward ≥ {args.target}"], table)]
    ratio = lambda a, b: (runs[a]["samples_per_s"] / runs[b]["samples_per_s"]  # noqa: E731
                          if a in runs and b in runs and "error" not in runs[a] and "error" not in runs[b] else None)
    for label, a, b, goal in [("async ÷ sync samples/s", "async", "sync", 1.3),
                              ("herd sync (2 Ray workers) ÷ TRL samples/s", "sync", "trl", 5.0),
                              ("herd in-process (pool) ÷ TRL samples/s", "pool", "trl", 5.0)]:
        v = ratio(a, b)
        md.append(f"- {label}: {v:.2f} (goal ≥ {goal})" if v else f"- {label}: n/a")
    (out / "rl.md").write_text("\n".join(md) + "\n")
    (out / "rl.json").write_text(json.dumps(runs, indent=2) + "\n")
    print("\n".join(md))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
        for name, r in runs.items():
            if r.get("eval"):
                axes[0].plot(*zip(*r["eval"]), "o-", label=name)
            if r.get("reward"):
                steps = [s for s, _ in r["reward"]]
                axes[1].plot([r["loop_s"] * s / max(steps) for s in steps], [v for _, v in r["reward"]], label=name)
        axes[0].set(xlabel="learner step", ylabel="held-out reward (greedy)")
        axes[1].set(xlabel="wall-clock s", ylabel="training reward")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "rl.png")
    except Exception as e:  # the table is the result; a plot failure should not hide it
        print(f"plot failed: {e}")


if __name__ == "__main__":
    main()
