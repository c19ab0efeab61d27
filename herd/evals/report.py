"""The speedrun's report card: a pure function of its run directories.

    md, data = build_report("runs/speedrun")     # → markdown text, the same facts as a dict
    write_report("runs/speedrun")                # OUT/report.md + OUT/report.json (atomic)

Layout of report.md (nanochat's report card, BASE | MID | SFT | RL columns, plus DPO):

    header     commit, hardware, software versions, code size (OUT/environment.json, written once
               by the speedrun), and wall-clock per stage (OUT/speedrun.json)
    stages     one column per model stage, one row per capability; each cell read from files the
               stages and evaluations already wrote:
                 validation loss          OUT/STAGE/summary.json (or the last metrics.jsonl row)
                 RL eval/accuracy, DPO    the same files, under TRL's metric names
                 rewards/accuracies
                 cloze / arithmetic /     OUT/STAGE/lm_eval/**/results_*.json (lm-eval with herd's
                 needle / bits per byte   offline tasks, herd/evals/tasks)
                 RULER effective length   OUT/STAGE/ruler/summary.json (absolute 85.6 threshold)
                 digit VQA (1 and 5      OUT/STAGE/skills/summary.json (herd eval skills; raw
                 images), tool use,       prompts for BASE and MID, chat for the others: the note
                 stop rate                under the table says which)
               a cell no file fills says "—" rather than leave a guess
    use cases  ask-repo accuracy at two context lengths and summarize ROUGE-L on the final model
               (OUT/usecases/summary.json, herd score-usecases)
    guards     tiny Llama Guard F1 (OUT/llama_guard/guard_eval.json) and Prompt Guard recall at
               1% FPR (OUT/prompt_guard/summary.json)
    claims     each seed claim against its ablation at equal compute, read from the benchmark
               result files (benchmarks/results/NAME.json, with the commit that produced them):
               PASS / FAIL when the file records a verdict, "not measured" when there is no file

It never runs a model or shells out: the same directories give the same bytes (a test checks it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STAGES = ("base", "mid", "sft", "rl", "dpo")
NOT = "—"

CLAIMS = [  # (claim, result file in benchmarks/results, what must hold)
    ("MoE beats dense with the same active params and tokens", "moe_vs_dense.json",
     "dense val loss − MoE val loss > both spreads"),
    ("iRoPE + temperature extrapolates past the training length better than RoPE", "irope_extrapolation.json",
     "RULER score at 4× the training length above RoPE's"),
    ("MetaP: the best learning rate transfers across widths", "metap_transfer.json",
     "best LR the same at every width (MetaP), drifting without"),
    ("FP8 training matches bf16 loss", "fp8_parity.json", "final loss within 1% of bf16"),
    ("Pruned SFT (hard 50%) beats full SFT at equal steps", "sft_pruning.json", "held-out accuracy ≥ full SFT's"),
    ("Hard-prompt RL beats uniform sampling", "rl_hard_vs_uniform.json", "reward at equal steps above uniform's"),
    ("Asynchronous RL is faster than synchronous at equal reward", "rl_async_vs_sync.json",
     "wall-clock to the same reward below sync's"),
    ("DPO raises the preference margin", "dpo.json", "held-out rewards/accuracies above 0.5 after DPO"),
    ("Codistillation: the distilled student beats the student trained alone at equal student compute",
     "distillation.json", "student val loss below the alone student's at every seed"),
]


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rows(path: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return []


def val_loss(d: Path):
    s = _json(d / "summary.json") or {}
    for k in ("val_loss", "eval_loss", "short_val_loss"):
        if isinstance(s.get(k), (int, float)):
            return float(s[k])
    for row in reversed(_rows(d / "metrics.jsonl")):
        for k in ("val_loss", "eval_loss"):
            if isinstance(row.get(k), (int, float)):
                return float(row[k])
    return None


def last_value(d: Path, *keys: str):
    """The first of `keys` in summary.json, else in the newest metrics.jsonl row that has it."""
    s = _json(d / "summary.json") or {}
    rows = [s, *reversed(_rows(d / "metrics.jsonl"))]
    for k in keys:
        for row in rows:
            if isinstance(row.get(k), (int, float)):
                return float(row[k])
    return None


def lm_eval_results(d: Path) -> dict:
    """{task: {metric: value}} from the newest lm-eval results file under d/lm_eval."""
    files = sorted((d / "lm_eval").rglob("results_*.json")) if (d / "lm_eval").is_dir() else []
    data = _json(files[-1]) if files else None
    return (data or {}).get("results", {})


def _metric(res: dict, task: str, prefix: str):
    for k, v in sorted(res.get(task, {}).items()):
        if k.startswith(prefix + ",") and isinstance(v, (int, float)):
            return float(v)
    return None


def skill(d: Path, key: str):
    """A score from OUT/STAGE/skills/summary.json (herd eval skills)."""
    v = (_json(d / "skills" / "summary.json") or {}).get(key)
    return float(v) if isinstance(v, (int, float)) else None


def ruler_length(d: Path):
    s = _json(d / "ruler" / "summary.json") or {}
    return (s.get("effective_length") or {}).get("absolute_85.6")


ROWS = [  # (row label, reader(stage dir, lm-eval results) → value or None, format)
    ("validation loss", lambda d, r: val_loss(d), "{:.3f}"),
    ("RL held-out accuracy (eval/accuracy)", lambda d, r: last_value(d, "eval/accuracy"), "{:.2f}"),
    ("DPO preference accuracy (rewards/accuracies)",
     lambda d, r: last_value(d, "eval_rewards/accuracies", "rewards/accuracies"), "{:.2f}"),
    ("held-out cloze, Shakespeare (acc)", lambda d, r: _metric(r, "herd_cloze_shakespeare", "acc"), "{:.2f}"),
    ("held-out cloze, KJV (acc)", lambda d, r: _metric(r, "herd_cloze_kjv", "acc"), "{:.2f}"),
    ("held-out text, bits per byte", lambda d, r: _metric(r, "herd_ppl", "bits_per_byte"), "{:.3f}"),
    ("reasoning: arithmetic (exact match)", lambda d, r: _metric(r, "herd_arith", "exact_match"), "{:.2f}"),
    ("RULER-lite needle (exact match)", lambda d, r: _metric(r, "herd_needle", "exact_match"), "{:.2f}"),
    ("RULER effective length (tokens)", lambda d, r: ruler_length(d), "{}"),
    ("digit VQA, 1 image (exact match)", lambda d, r: skill(d, "digit_vqa_1"), "{:.2f}"),
    ("digit VQA, 5 images (exact match)", lambda d, r: skill(d, "digit_vqa_5"), "{:.2f}"),
    ("tool use: right calculator call", lambda d, r: skill(d, "tool_use"), "{:.2f}"),
    ("tool use: any calculator call", lambda d, r: skill(d, "tool_call_rate"), "{:.2f}"),
    ("stop rate (replies ending in a stop token)", lambda d, r: skill(d, "stop_rate"), "{:.2f}"),
]
SKILL_NOTE = ("Digit VQA, tool use and stop rate: `herd eval skills` on held-out items of the SFT data's "
              "generators (herd/data/chat_data.py). Prompt layout per column: {layouts} — raw = the pre-training "
              "layout (each digit image captioned in turn, the question answered from the digits read: perception "
              "only; tool use as plain text), chat = the Llama 4 chat format.")


def _fmt(v, fmt: str) -> str:
    if v is None:
        return NOT
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def stage_table(out: Path, state: dict) -> tuple[list[str], dict]:
    data = {}
    for label, read, fmt in ROWS:
        data[label] = {}
        for s in STAGES:
            d = out / s
            data[label][s] = read(d, lm_eval_results(d)) if (d / "config.json").exists() else None
    head = "| | " + " | ".join(s.upper() for s in STAGES) + " |"
    lines = [head, "|---" * (len(STAGES) + 1) + "|"]
    status = [state.get(s, {}).get("status", "not run") for s in STAGES]
    lines.append("| stage status | " + " | ".join(status) + " |")
    for label, read, fmt in ROWS:
        cells = [_fmt(data[label][s], fmt) for s in STAGES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines, data


def skills_note(out: Path) -> str:
    fmts = [(_json(out / s / "skills" / "summary.json") or {}).get("prompt_format") for s in STAGES]
    return SKILL_NOTE.format(layouts=", ".join(f"{s.upper()} {f or NOT}" for s, f in zip(STAGES, fmts)))


def usecase_rows(out: Path) -> tuple[list[str], dict]:
    """The use cases scored on the final model (OUT/usecases/summary.json, herd score-usecases)."""
    u = _json(out / "usecases" / "summary.json") or {}
    lines = ["| use case | measure | value |", "|---|---|---|"]
    for ctx, r in sorted((u.get("ask_repo") or {}).items(), key=lambda kv: int(kv[0])):
        lines.append(f"| `herd ask-repo`, {ctx}-token context | right file cited first, {r['n']} held-out "
                     f"\"where is X defined\" questions | {r['accuracy']:.2f} (chance {r['chance']:.2f}, "
                     f"{r['files']:.1f} files packed) |")
    sm = u.get("summarize") or {}
    if sm:
        lines.append(f"| `herd summarize` | ROUGE-L F1 vs the docstring's summary line, {sm['n']} held-out "
                     f"stdlib functions | {sm['rougeL_f1']:.3f} |")
    if len(lines) == 2:
        lines.append(f"| ask-repo, summarize | not run | {NOT} |")
    model = Path(u["model"]).name.upper() if u.get("model") else NOT
    return [f"On the final model ({model}); held-out = functions whose key is in the SFT data's test split.", ""] + \
        lines, u


def guard_rows(out: Path) -> tuple[list[str], dict]:
    lg = (_json(out / "llama_guard" / "guard_eval.json") or {}).get("report", {})
    pg = (_json(out / "prompt_guard" / "summary.json") or {}).get("test", {})
    f1 = (lg.get("prompt") or {}).get("f1")
    rec = pg.get("recall_at_1pct_fpr")
    data = {"llama_guard_prompt_f1": f1, "prompt_guard_recall_at_1pct_fpr": rec}
    return ["| guard | measure | value |", "|---|---|---|",
            f"| tiny Llama Guard | F1 on held-out prompts | {_fmt(f1, '{:.3f}')} |",
            f"| Prompt Guard (n-gram) | recall at 1% FPR, S-Labs test | {_fmt(rec, '{:.3f}')} |"], data


def claim_rows(results_dir: Path) -> tuple[list[str], list[dict]]:
    lines = ["| claim | must hold | result | evidence |", "|---|---|---|---|"]
    data = []
    for claim, fname, threshold in CLAIMS:
        res = _json(results_dir / fname)
        verdict, evidence = "not measured", "no result file"
        if res is not None:
            c = res.get("claim") if isinstance(res, dict) else None
            evidence = f"benchmarks/results/{fname}" + (f" @ {res['commit']}" if res.get("commit") else "")
            if isinstance(c, dict) and isinstance(c.get("pass"), bool):
                verdict = ("PASS" if c["pass"] else "FAIL") + (" (smoke run)" if c.get("smoke") else "")
                if isinstance(c.get("margin"), (int, float)):
                    evidence += f", margin {c['margin']:+.4f}"
            else:
                verdict = "measured, no verdict recorded"
        lines.append(f"| {claim} | {threshold} | {verdict} | {evidence} |")
        data.append({"claim": claim, "file": fname, "threshold": threshold, "result": verdict})
    return lines, data


def build_report(out: str | Path, results_dir: str | Path | None = None) -> tuple[str, dict]:
    """→ (report.md text, report.json dict) from a speedrun directory and the benchmark results."""
    out = Path(out)
    results_dir = Path(results_dir) if results_dir else Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    env = _json(out / "environment.json") or {}
    state = (_json(out / "speedrun.json") or {}).get("stages", {})
    v = env.get("versions", {})
    md = ["# herd speedrun report" + (" (--quick: toy sizes, numbers mean nothing)" if env.get("quick") else ""), "",
          f"- commit: `{env.get('commit', 'unknown')}`",
          f"- hardware: {env.get('cpu', 'unknown')}, {env.get('cores', '?')} cores ({env.get('platform', '')})",
          f"- software: Python {env.get('python', '?')}, " + ", ".join(f"{k} {x}" for k, x in sorted(v.items())),
          f"- code: {env.get('code_lines', '?')} lines of Python in {env.get('code_files', '?')} files under herd/",
          ""]
    total = sum(s.get("wall_s", 0.0) for s in state.values())
    md += ["## Stages", "", "| stage | status | wall-clock (s) | command |", "|---|---|---|---|"]
    for name, s in state.items():
        md.append(f"| {name} | {s.get('status', '?')}{' — ' + s['reason'] if s.get('reason') else ''} | "
                  f"{s.get('wall_s', NOT)} | `{s.get('cmd', '')}` |")
    md += [f"| total | | {total:.1f} | |", "", "## What each model can do", ""]
    table, stage_data = stage_table(out, state)
    md += table + ["", skills_note(out), "", "## Use cases", ""]
    ul, udata = usecase_rows(out)
    md += ul + ["", "## Guards", ""]
    gl, gdata = guard_rows(out)
    md += gl + ["", "## Claims", "",
                "Each claim against its ablation at equal compute, from the benchmark result files "
                "(the speedrun is too short to test them itself).", ""]
    cl, cdata = claim_rows(results_dir)
    md += cl + [""]
    data = {"environment": env, "stages": state, "total_wall_s": round(total, 1), "table": stage_data,
            "guards": gdata, "claims": cdata,
            "usecases": udata}
    return "\n".join(md), data


def write_report(out: str | Path, results_dir: str | Path | None = None) -> str:
    out = Path(out)
    md, data = build_report(out, results_dir)
    for name, text in (("report.md", md), ("report.json", json.dumps(data, indent=1, sort_keys=True) + "\n")):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return md
