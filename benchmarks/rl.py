"""Online RL claims (issue 13): hard-prompt pool vs uniform prompts, asynchronous (staleness 1) vs
synchronous Ray workers, herd vs TRL's GRPOTrainer.

    # reward per learner step, not timing-dependent (1 thread, any machine):
    python benchmarks/rl.py --claim hard --init runs/speedrun/sft --tasks chain_sum --seeds 0,1 --steps 40 \
        --out runs/bench_rl --result benchmarks/results/rl_hard_vs_uniform.json
    # samples/s, timing-dependent (an idle 2-core machine, ~4 min): sync, async, TRL at 1 and 8 prompts/step
    OMP_NUM_THREADS=1 python benchmarks/rl.py --claim timing --init runs/speedrun/sft --tasks chain_sum --steps 40 \
        --eval-every 40 --trl-prompts 1,8 --trl-steps 5 --trl-threads 2 --trl-timeout 240 \
        --out runs/bench_rl_idle --result benchmarks/results/rl_async_vs_sync.json
    # TRL's per-step time alone (no claim decided)
    python benchmarks/rl.py --claim timing --trl-only --init runs/speedrun/sft --out runs/bench_rl_trl
    python benchmarks/rl.py --smoke        # a random tiny model, 2 steps each: checks the script runs

Runs (all from --init, same G, prompts per step, completion length, rewards, learning rate):
  pool_s{seed}     herd rl, in-process worker, staleness 0, prompts from the pass-rate pool (τ = 0.75)
  uniform_s{seed}  the same with --uniform (prompts drawn uniformly; zero-advantage groups still dropped)
  sync             herd rl, learner + 2 rollout workers as Ray actors, --max-staleness 0
  async            the same with --max-staleness 1
  trl_p{P}         TRL GRPOTrainer on the same directory loaded as transformers' Llama4ForCausalLM, the same
                   prompts (rendered in the Llama 4 chat format), the same reward functions (herd's are TRL
                   callables), G, completion length, β = 0; one generation batch of P prompts × G per
                   optimizer step (steps_per_generation 1, no accumulation). It runs --trl-steps steps in a
                   subprocess under a hard wall-clock cap (--trl-timeout): each step is timed when it ends
                   (a callback), the first is warm-up and not counted, a capped run reports the steps it
                   completed. samples/s = P·G × counted steps ÷ their seconds; herd ÷ TRL is taken against
                   the fastest P (--trl-prompts 1,8). (A single budgeted run at P = 8 never ended here:
                   the budget was checked between steps, and 2 threads under load made one step minutes.)
Reported: held-out reward (greedy, eval/reward on the tasks' held-out split) per learner step, samples/s
(completions generated and scored ÷ loop wall-clock from the first batch; evaluation inside the loop
counts, so the timing command evaluates only at the end), the timeline of a step (herd rl's time/*
metrics: update, publish, waiting, scoring; worker busy fraction), wall-clock to a training reward
both sync and async reach (--target, default: the lower of their final 3-step means). Claims
(report-card JSON, herd/evals/report.py CLAIMS): pool ≥ uniform in held-out reward averaged over the
evaluations and seeds; async reaches the common reward in less wall-clock than sync (goal also:
async ≥ 1.3× sync samples/s, herd ≥ 5× TRL samples/s). A run directory that already holds a finished
run of the same name is reused (delete it to rerun). Writes OUT/rl.json, OUT/rl.md (every run found:
the combined table) and OUT/rl.png.
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


def finished(d: Path, steps: int) -> bool:
    """d holds a run that reached `steps` with a held-out evaluation there (constant LR: a longer run
    stopped at that step is the same run)."""
    try:
        return any(r["step"] == steps and "eval/reward" in r for r in rows_of(d))
    except (OSError, ValueError, KeyError):
        return False


def herd_run(name: str, out: Path, args, extra: list[str], seed: int | None = None) -> dict:
    d = out / name
    seed = args.seed if seed is None else seed
    cmd = [sys.executable, "-m", "herd", "rl", "--init", args.init, "--tasks", args.tasks, "--out", str(d),
           "--max-steps", str(args.steps), "--group-size", str(args.group_size),
           "--prompts-per-step", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens),
           "--eval-every", str(args.eval_every or max(1, args.steps // 4)), "--eval-prompts", str(args.eval_prompts),
           "--ckpt-every", str(args.steps), "--per-task", str(args.per_task), "--seed", str(seed),
           "--rewards", args.rewards, "--lr", str(args.lr), "--constant-steps", "1000", "--no-progress", *extra]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    wall = None
    if not finished(d, args.steps):
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        wall = round(time.perf_counter() - t, 1)
        if r.returncode != 0:
            errs = [x for x in r.stderr.splitlines() if "rror" in x] or [f"exit {r.returncode}"]
            return {"name": name, "error": errs[-1].strip()}
    rows = [r for r in rows_of(d) if r["step"] <= args.steps]
    workers = int(extra[extra.index("--workers") + 1]) if "--workers" in extra else 1
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
    initial = json.loads((d / "initial_eval.json").read_text())
    # samples/s from the last row (cumulative samples ÷ loop seconds): also right for a run stopped early
    sps = rows[-1]["samples_per_s"]
    loop_s = summary.get("wall_s") if summary.get("step") == args.steps else None
    return {"name": name, "seed": seed, "cmd": " ".join(cmd[1:]), "wall_s": wall, "loop_s": loop_s,
            "samples_per_s": round(sps, 2), "samples": summary.get("total_samples"),
            "initial_eval": initial.get("eval/reward"), "initial_accuracy": initial.get("eval/accuracy"),
            "eval": [(r["step"], r["eval/reward"]) for r in rows if "eval/reward" in r],
            "accuracy": [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r],
            "reward": [(r["step"], r["reward"]) for r in rows if "reward" in r], "pool": summary.get("pool"),
            # the mechanism: groups with a learning signal per step, zero-advantage groups dropped
            "groups_kept_per_step": round(mean(r.get("groups/kept") for r in rows) or 0, 3),
            "zero_adv_dropped_per_step": round(mean(r.get("groups/zero_adv_dropped") for r in rows) or 0, 3),
            "stale_dropped": summary.get("total_stale_dropped"), "timeline": timeline(rows, workers)}


def timeline(rows: list[dict], workers: int) -> dict:
    """Where a step's seconds go (herd rl's time/* metrics, means over steps): the learner's update,
    weight publish, waiting on rollouts, scoring; and how busy the rollout workers were (worker-seconds
    generating ÷ workers × loop seconds; steps 2.. so that the first update's absence does not count)."""
    rows = [r for r in rows if r["step"] > 1 and "time/step_s" in r]
    if not rows:
        return {}
    out = {k.split("/")[1]: round(mean(r[k] for r in rows), 3)
           for k in ("time/step_s", "time/train_s", "time/publish_s", "time/wait_s", "time/score_s")}
    busy = sum(r["time/generate_s"] for r in rows) / (max(workers, 1) * sum(r["time/step_s"] for r in rows))
    return {**out, "worker_busy": round(busy, 3)}


def smoothed(run: dict) -> list[float]:
    """Training reward, mean of the last 3 steps at each step."""
    rw = [v for _, v in run.get("reward", [])]
    return [sum(rw[max(0, i - 2): i + 1]) / len(rw[max(0, i - 2): i + 1]) for i in range(len(rw))]


def time_to(run: dict, target: float, steps_wall: float) -> float | None:
    """Wall seconds until the smoothed training reward first reaches target (a step's time taken as
    the loop's wall-clock spread evenly over its steps)."""
    sm = smoothed(run)
    for i, v in enumerate(sm):
        if v >= target - 1e-9:
            return round(steps_wall * (i + 1) / len(sm), 1)
    return None


# TRL's GRPOTrainer, timed per step. One step = generate the step's groups through transformers, score,
# one optimizer step; a step counts only once it has ended (on_step_end), so a run cut by the wall-clock
# cap still reports every completed step. Each completed step prints one JSON line at once (flushed):
# the parent keeps the lines it read before it killed the process.
TRL_SCRIPT = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
from datasets import Dataset
from transformers import Llama4ForCausalLM, PreTrainedTokenizerFast, TrainerCallback
import trl
from herd.tokenizer import load_tokenizer
from herd.train.rl.learner import load_items, prompt_ids, parse_rewards
from herd.train.rl.rewards import REWARDS
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
class PerStep(TrainerCallback):
    # a step's time: from the previous step's end (or the loop's start) to this step's end
    def on_train_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        print(json.dumps({"step": state.global_step, "step_s": now - self.t}), flush=True)
        self.t = now
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "reward" in logs:
            print(json.dumps({"step": state.global_step, "reward": logs["reward"]}), flush=True)
# one generation batch per optimizer step (steps_per_generation 1, no accumulation): a step generates
# exactly P prompts × G completions, the same groups herd's step generates
args = trl.GRPOConfig(output_dir=cfg["out"], num_generations=cfg["G"], max_completion_length=cfg["max_new"],
                      per_device_train_batch_size=cfg["G"] * cfg["P"], gradient_accumulation_steps=1,
                      steps_per_generation=1, num_iterations=1, learning_rate=cfg["lr"], beta=0.0,
                      max_steps=cfg["steps"], logging_steps=1, report_to=[], use_cpu=True, bf16=False,
                      save_strategy="no", temperature=1.0, reward_weights=list(weights.values()), seed=cfg["seed"],
                      disable_tqdm=True, router_aux_loss_coef=0.0)  # herd rl has no router auxiliary loss either
trainer = trl.GRPOTrainer(model=model, args=args, reward_funcs=[wrap(n) for n in weights],
                          train_dataset=Dataset.from_list(rows), processing_class=hf_tok, callbacks=[PerStep()])
print(json.dumps({"ready": True}), flush=True)
trainer.train()
"""


def trl_run(out: Path, args, prompts: int) -> dict:
    """TRL GRPOTrainer for args.trl_steps steps (the first is warm-up, reported apart) under a hard
    wall-clock cap (args.trl_timeout s, model loading included): samples/s = P·G × counted steps ÷ their
    summed step seconds. A run killed at the cap reports the steps it completed; none completed is an
    error that says so."""
    cfg = {"init": args.init, "tasks": args.tasks, "per_task": args.per_task, "seed": args.seed,
           "rewards": args.rewards, "out": str(out / f"trl_p{prompts}"), "G": args.group_size, "P": prompts,
           "max_new": args.max_new_tokens, "lr": args.lr, "steps": args.trl_steps,
           "threads": args.trl_threads}
    proc = subprocess.Popen([args.trl_python, "-c", TRL_SCRIPT, json.dumps(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        stdout, stderr = proc.communicate(timeout=args.trl_timeout)
        capped = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # its own session: the trainer and anything it started
        stdout, stderr = proc.communicate()
        capped = True
    lines = []
    for x in stdout.splitlines():
        try:
            lines.append(json.loads(x))
        except ValueError:
            continue
    steps = [(r["step"], r["step_s"]) for r in lines if "step_s" in r]
    rewards = [(r["step"], r["reward"]) for r in lines if "reward" in r]
    per_step = cfg["G"] * cfg["P"]
    base = {"name": f"trl_p{prompts}", "steps_done": len(steps), "steps_asked": cfg["steps"],
            "capped_at_s": args.trl_timeout if capped else None, "prompts_per_step": cfg["P"], "samples_per_step": per_step,
            "step_s": [round(s, 2) for _, s in steps], "reward": rewards, "eval": []}
    if not capped and proc.returncode != 0 and len(steps) < 2:
        errs = [x for x in stderr.splitlines() if "Error" in x or "error" in x] or [f"exit {proc.returncode}"]
        return {**base, "error": errs[-1].strip()}
    if len(steps) < 2:  # the warm-up step alone (or nothing) finished before the cap
        return {**base, "error": f"{len(steps)} TRL step(s) ended within the {args.trl_timeout} s cap (≥ 2 needed: "
                                 f"the first is warm-up); one step generates {per_step} completions"}
    counted = [s for _, s in steps[1:]]
    return {**base, "warmup_step_s": round(steps[0][1], 2), "loop_s": round(sum(counted), 2),
            "samples": per_step * len(counted), "samples_per_s": round(per_step * len(counted) / sum(counted), 2)}


def trl_arms(out: Path, args) -> dict:
    """One TRL run per --trl-prompts batch size (prompts per step), each in its own capped subprocess."""
    runs = {}
    for P in args.trl_prompts:
        print(f"running trl_p{P} ({args.trl_steps} steps of {P} prompt(s) × G = {args.group_size}, "
              f"cap {args.trl_timeout:.0f} s) ...", flush=True)
        runs[f"trl_p{P}"] = trl_run(out, args, P)
        print(json.dumps(runs[f"trl_p{P}"])[:300], flush=True)
    return runs


def fastest_trl(runs: dict) -> str | None:
    ok = [n for n, r in runs.items() if n.startswith("trl") and r.get("samples_per_s")]
    return max(ok, key=lambda n: runs[n]["samples_per_s"]) if ok else None


def smoke_model(out: Path) -> str:
    from tests.train.conftest import chat_model_dir

    d, _ = chat_model_dir(out / "smoke_model", vision=False)
    return str(d)


def mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def commit() -> str | None:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return r.stdout.strip() or None


def config_of(args) -> dict:
    return {k: getattr(args, k) for k in ("init", "tasks", "steps", "group_size", "prompts", "max_new_tokens",
                                          "eval_prompts", "per_task", "rewards", "lr", "threads", "trl_prompts",
                                          "trl_steps", "trl_threads", "trl_timeout")}


def hard_claim(out: Path, args) -> tuple[dict, dict]:
    """pool vs uniform, per seed, in-process worker at staleness 0 → (result JSON, runs)."""
    runs = {}
    for seed in args.seeds:
        for arm, extra in (("pool", []), ("uniform", ["--uniform"])):
            name = f"{arm}_s{seed}"
            print(f"running {name} ...", flush=True)
            runs[name] = herd_run(name, out, args, ["--workers", "0", "--max-staleness", "0", *extra], seed)
            print(json.dumps(runs[name])[:200], flush=True)
    per_seed, curve = [], {}
    for seed in args.seeds:
        p, u = runs[f"pool_s{seed}"], runs[f"uniform_s{seed}"]
        if "error" in p or "error" in u:
            continue
        per_seed.append({"seed": seed, "initial_eval": p["initial_eval"],
                         "pool_zero_adv_dropped_per_step": p["zero_adv_dropped_per_step"],
                         "uniform_zero_adv_dropped_per_step": u["zero_adv_dropped_per_step"],
                         "pool_mean_eval": mean(v for _, v in p["eval"]),
                         "uniform_mean_eval": mean(v for _, v in u["eval"]),
                         "pool_final_eval": p["eval"][-1][1], "uniform_final_eval": u["eval"][-1][1],
                         "pool_final_accuracy": p["accuracy"][-1][1], "uniform_final_accuracy": u["accuracy"][-1][1],
                         "pool_groups_kept_per_step": p["groups_kept_per_step"],
                         "uniform_groups_kept_per_step": u["groups_kept_per_step"]})
        for arm, r in (("pool", p), ("uniform", u)):
            for step, v in [(0, r["initial_eval"]), *r["eval"]]:
                curve.setdefault(step, {}).setdefault(arm, []).append(v)
    pm, um = mean(s["pool_mean_eval"] for s in per_seed), mean(s["uniform_mean_eval"] for s in per_seed)
    margin = None if pm is None or um is None else pm - um
    wins = sum(s["pool_mean_eval"] >= s["uniform_mean_eval"] for s in per_seed)
    heldout = next((json.loads((out / n / "summary.json").read_text())["heldout_prompts"] for n in runs
                    if (out / n / "summary.json").exists()), None)
    claim = {"pass": margin is not None and margin >= 0, "margin": None if margin is None else round(margin, 4),
             "smoke": args.smoke,
             "metric": "held-out reward (greedy, eval/reward) averaged over the evaluations of a run, then over "
                       "seeds: pool minus uniform", "seeds": len(per_seed), "seeds_pool_at_least_uniform": wins,
             # one held-out prompt more or less moves a run's eval/reward by about 1/heldout_prompts
             "heldout_prompts": heldout}
    table = [[step, *(round(mean(curve[step].get(a, [])) or 0, 4) for a in ("pool", "uniform"))]
             for step in sorted(curve)]
    result = {"claim": claim, "commit": commit(), "machine": machine_line(), "config": config_of(args),
              "per_seed": per_seed,
              "heldout_reward_by_step": [{"step": s, "pool": a, "uniform": b} for s, a, b in table],
              "before_after_rl": {"initial_eval_reward": mean(s["initial_eval"] for s in per_seed),
                                  "after_pool_rl_eval_reward": mean(s["pool_final_eval"] for s in per_seed),
                                  "after_uniform_rl_eval_reward": mean(s["uniform_final_eval"] for s in per_seed),
                                  "after_pool_rl_accuracy": mean(s["pool_final_accuracy"] for s in per_seed),
                                  "initial_accuracy": mean(runs[f"pool_s{s['seed']}"]["initial_accuracy"]
                                                           for s in per_seed)},
              "runs": runs}
    return result, runs


def timing_claim(out: Path, args) -> tuple[dict, dict]:
    """sync vs async Ray workers, and TRL for the sync run's wall-clock → (result JSON, runs)."""
    if args.trl_only:  # TRL's per-step time alone: no claim decided
        runs = trl_arms(out, args)
        return {"claim": {"pass": None, "smoke": args.smoke, "metric": "TRL arm alone (--trl-only)"},
                "config": config_of(args), "ratios": {}, "runs": runs}, runs
    runs = {}
    for name, stale in (("sync", "0"), ("async", "1")):
        print(f"running {name} ...", flush=True)
        runs[name] = herd_run(name, out, args, ["--workers", "2", "--max-staleness", stale])
        print(json.dumps(runs[name])[:200], flush=True)
    if not args.no_trl:
        runs.update(trl_arms(out, args))
    s, a = runs["sync"], runs["async"]
    ok = "error" not in s and "error" not in a and s.get("loop_s") and a.get("loop_s")
    target = args.target
    if ok and target is None:  # a reward both reach: the lower of their final smoothed training rewards
        target = round(min(smoothed(s)[-1], smoothed(a)[-1]), 4)
    t_s = time_to(s, target, s["loop_s"]) if ok else None
    t_a = time_to(a, target, a["loop_s"]) if ok else None
    margin = (t_s - t_a) / t_s if t_s and t_a is not None else None
    ratio = lambda x, y: (round(runs[x]["samples_per_s"] / runs[y]["samples_per_s"], 3)  # noqa: E731
                          if x in runs and y in runs and "error" not in runs[x] and "error" not in runs[y] else None)
    if not args.no_trl and not fastest_trl(runs):
        print("no TRL arm completed 2 steps: herd ÷ TRL not measured", flush=True)
    claim = {"pass": margin is not None and margin > 0, "margin": None if margin is None else round(margin, 4),
             "smoke": args.smoke,
             "metric": "(sync − async) ÷ sync wall-clock seconds to a training reward both reach (3-step mean)",
             "target_reward": target, "sync_s_to_target": t_s, "async_s_to_target": t_a}
    result = {"claim": claim, "commit": commit(), "machine": machine_line(), "config": config_of(args),
              "samples_per_s": {k: r.get("samples_per_s") for k, r in runs.items()},
              "ratios": {"async_over_sync_samples_per_s": ratio("async", "sync"), "goal_async_over_sync": 1.3,
                         # against TRL's fastest batch size: the comparison least favourable to herd
                         "herd_sync_over_trl_samples_per_s": ratio("sync", fastest_trl(runs)),
                         "herd_async_over_trl_samples_per_s": ratio("async", fastest_trl(runs)),
                         "trl_arm": fastest_trl(runs), "goal_herd_over_trl": 5.0},
              "runs": runs}
    return result, runs


def machine_line() -> str:
    from common import machine

    return f"{machine()}; load {os.getloadavg()[0]:.2f}"


def combined_table(runs: dict, target: float | None) -> str:
    from common import markdown_table

    rows = []
    for name, r in sorted(runs.items()):
        if "error" in r:
            rows.append([name, "error: " + r["error"][:80], "", "", "", "", ""])
            continue
        loop = r.get("loop_s")
        rows.append([name, r.get("samples_per_s"), r.get("samples") or "", loop or "",
                     r.get("initial_eval", "") if r.get("initial_eval") is not None else "",
                     r["eval"][-1][1] if r.get("eval") else "",
                     (time_to(r, target, loop) if target is not None and loop else "") or ""])
    return markdown_table(["run", "samples/s", "samples", "loop wall s", "held-out reward before",
                           "held-out reward after (last eval)", f"s to train reward ≥ {target}"], rows)


def plot(runs: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timing = any(r.get("loop_s") for n, r in runs.items() if n in ("sync", "async") or n.startswith("trl"))
    fig, axes = plt.subplots(1, 2 if timing else 1, figsize=(11 if timing else 6, 4), dpi=100, squeeze=False)
    axes = list(axes[0]) + [None] * (2 - axes.shape[1])
    for name, r in sorted(runs.items()):
        if r.get("eval"):
            axes[0].plot(*zip(*[(0, r["initial_eval"]), *r["eval"]]), "o-" if name.startswith("pool") else "s--",
                         label=name, ms=4)
        if timing and r.get("reward") and r.get("loop_s") and (name in ("sync", "async") or name.startswith("trl")):
            steps = [s for s, _ in r["reward"]]
            axes[1].plot([r["loop_s"] * s / max(steps) for s in steps], [v for _, v in r["reward"]], label=name)
    axes[0].set(xlabel="learner step", ylabel="held-out reward (greedy)", title="hard-prompt pool vs uniform")
    if timing:
        axes[1].set(xlabel="wall-clock s", ylabel="training reward", title="async vs sync vs TRL")
    for ax in filter(None, axes):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--claim", choices=("hard", "timing", "all"), default="all",
                   help="hard: pool vs uniform (reward per step); timing: async vs sync vs TRL (an idle machine)")
    p.add_argument("--init", help="model directory (an SFT run's --out)")
    p.add_argument("--tasks", default="chain_sum")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps (0: steps // 3)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--eval-prompts", type=int, default=128)
    p.add_argument("--per-task", type=int, default=400)
    p.add_argument("--rewards", default="correctness:1,format:0.2")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0, help="seed of the timing runs")
    p.add_argument("--seeds", default="0,1", help="seeds of the pool/uniform runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the learner (herd rl --threads)")
    p.add_argument("--target", type=float, default=None,
                   help="training reward for the time-to-target (default: the lower final of sync and async)")
    p.add_argument("--trl-python", default=sys.executable, help="python of the environment with trl (the oracle venv)")
    p.add_argument("--no-trl", action="store_true", help="skip the TRL run")
    p.add_argument("--trl-only", action="store_true", help="timing claim: the TRL arm alone (its per-step time)")
    p.add_argument("--trl-steps", type=int, default=3, help="TRL steps (≥ 2; the first is warm-up, not counted)")
    p.add_argument("--trl-prompts", default="1,8",
                   help="prompts per TRL step (G completions each); a list runs one TRL arm per size and the "
                        "herd ÷ TRL ratio is taken against the fastest")
    p.add_argument("--trl-threads", type=int, default=2,
                   help="torch threads of the TRL process (2: the idle 2-core machine's cores, as herd's 3 "
                        "single-threaded processes share them; use 1 on a loaded machine, where 2 OpenMP threads "
                        "stall each other)")
    p.add_argument("--trl-timeout", type=float, default=300.0,
                   help="hard wall-clock cap on the TRL subprocess, s (the steps completed by then are reported)")
    p.add_argument("--out", default="runs/bench_rl")
    p.add_argument("--result", default=None, help="write the claim's report-card JSON here (one --claim only)")
    p.add_argument("--smoke", action="store_true", help="random tiny model, 2 steps per run")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.trl_prompts = [int(s) for s in args.trl_prompts.split(",") if s.strip()]
    args.eval_every = args.eval_every or max(1, args.steps // 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.init = args.init or smoke_model(out)
        args.steps, args.eval_every, args.group_size, args.prompts, args.max_new_tokens = 2, 1, 4, 2, 6
        args.eval_prompts, args.per_task, args.rewards = 4, 40, "format:1"
    if not args.init:
        p.error("--init DIR is required (or --smoke)")
    if args.result and args.claim == "all":
        p.error("--result needs one --claim (hard or timing)")
    if args.trl_only and (args.result or args.claim != "timing"):
        p.error("--trl-only goes with --claim timing and without --result (it decides no claim)")
    if args.trl_steps < 2:
        p.error("--trl-steps must be ≥ 2 (the first step is warm-up, not counted)")
    results = {}
    if args.claim in ("hard", "all"):
        results["hard"], _ = hard_claim(out, args)
    if args.claim in ("timing", "all"):
        results["timing"], _ = timing_claim(out, args)
    store = out / "rl.json"  # every run of every claim in OUT: the combined table
    merged = json.loads(store.read_text()) if store.exists() else {}
    for r in results.values():
        merged.update(r["runs"])
    store.write_text(json.dumps(merged, indent=2) + "\n")
    target = results.get("timing", {}).get("claim", {}).get("target_reward")
    md = [f"machine: {machine_line()}", "", combined_table(merged, target), ""]
    for kind, r in results.items():
        md.append(f"- {kind}: claim {json.dumps(r['claim'])}")
        if kind == "timing":
            md.append(f"- ratios: {json.dumps(r['ratios'])}")
        if kind == "hard":
            md.append(f"- before/after RL: {json.dumps(r['before_after_rl'])}")
    (out / "rl.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    try:
        plot(merged, out / "rl.png")
    except Exception as e:  # the table is the result; a plot failure should not hide it
        print(f"plot failed: {e}")
    if args.result:
        (res,) = results.values()
        Path(args.result).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result).write_text(json.dumps(res, indent=2) + "\n")
        if (out / "rl.png").exists():
            Path(args.result).with_suffix(".png").write_bytes((out / "rl.png").read_bytes())
        print(f"wrote {args.result}")


if __name__ == "__main__":
    main()
