"""RULER-style long-context evaluation through herd's inference engine.

    herd eval ruler runs/tiny --tasks niah_single_1,niah_multikey_1 --lengths 1k,4k,16k \\
        --samples 20 --depths 0,25,50,75,100 --out runs/tiny/ruler

    records = run_ruler(model, tok, samples, prompt_format="raw")    # one record per sample
    summary = aggregate(records, train_length=256)                   # table + effective lengths

Idea (RULER, Hsieh et al. 2024; NVIDIA/RULER scripts/eval/synthetic/constants.py): generate
synthetic samples at exact token lengths (herd/data/longctx.py), let the model continue each
prompt greedily for the task's `tokens_to_generate`, and score by *string containment* of the
reference values, case-insensitive, never an LLM judge:

    string_match_all(pred, refs) = 100 · mean_r [r.lower() in pred.lower()]   (every task here)
    string_match_part(pred, refs) = 100 · max_r [r.lower() in pred.lower()]   (RULER's QA tasks)

so "The number is 7341295, I think." scores 100 for 7341295 and "7341296" scores 0.

Outputs (OUT/): `samples.jsonl` (task, length, depth, prediction, answers, score, seconds per
sample), `summary.json` (per-task × per-length table 0–100, the average per length, effective
lengths, prompt format and its template hash, seconds per sample, peak RSS), `table.md`, and
`heatmap.png` (length × depth mean score over the needle tasks, the classic NIAH picture). They
are written to a temporary folder and moved in only when the whole run succeeded.

Effective length: the longest evaluated length L such that the average score at L and at every
shorter evaluated length exceeds the threshold. Two thresholds: RULER's absolute 85.6 (Llama-2-7B's
score at 4K) and 90% of the model's own average at its training length (the `seq_len` in the
run's train_config.json, or --train-length).

Prompt layout: base models get `<|begin_of_text|> input answer_prefix` (the raw layout the
lengths are exact for); chat models get the Llama 4 chat format (herd/chat.py: a user turn with
the input, then the assistant header followed by the answer prefix). `--format auto` picks chat
when the model directory ships a chat template; the summary says which (RULER#54: the wrong
template moves scores by ~7 points).

Prefill goes through the Engine in chunks (`--prefill-chunk`), so long prompts never build a
T×T score matrix and RoPE layers keep only their chunk of KV cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ABSOLUTE_THRESHOLD = 85.6  # RULER: Llama-2-7B (4K) average
RELATIVE_THRESHOLD = 0.9  # of the model's own score at its training length
PART_TASKS: frozenset[str] = frozenset({"qa_1", "qa_2"})  # RULER scores QA with string_match_part


# ----------------------------------------------------------------------------- scoring


def string_match_all(prediction: str, references: list[str]) -> float:
    """100 × the fraction of references contained in the prediction (case-insensitive)."""
    p = prediction.lower()
    return 100.0 * sum(r.lower() in p for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """100 if any reference is contained in the prediction (case-insensitive), else 0."""
    p = prediction.lower()
    return 100.0 * max(r.lower() in p for r in references)


def score(task: str, prediction: str, references: list[str]) -> float:
    return (string_match_part if task in PART_TASKS else string_match_all)(prediction, references)


# ----------------------------------------------------------------------------- prompts


def detect_format(model_name: str) -> str:
    """'chat' when the model directory ships a chat template, else 'raw'."""
    d = Path(model_name)
    if (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file():
        return "chat"
    cfg = d / "tokenizer_config.json"
    if cfg.is_file():
        try:
            if json.loads(cfg.read_text()).get("chat_template"):
                return "chat"
        except (json.JSONDecodeError, OSError):
            pass
    return "raw"


def prompt_ids(tokenizer, sample: dict, prompt_format: str) -> list[int]:
    """Token ids the model sees for a sample (raw: BOS + input + prefix; chat: Llama 4 chat format)."""
    if prompt_format == "raw":
        return tokenizer.encode(sample["input"] + sample.get("answer_prefix", ""), bos=True)
    if prompt_format == "chat":
        from herd.chat import encode_messages

        ids, _ = encode_messages(tokenizer, [{"role": "user", "content": sample["input"]}])
        prefix = sample.get("answer_prefix", "").lstrip()
        return ids + (tokenizer.encode(prefix) if prefix else [])
    raise ValueError(f"unknown prompt format {prompt_format!r}; choose raw or chat")


def template_hash(tokenizer, prompt_format: str) -> str:
    """SHA-256 (16 hex) of the rendered layout around a placeholder input: pins the template used."""
    ids = prompt_ids(tokenizer, {"input": "{input}", "answer_prefix": " {answer_prefix}"}, prompt_format)
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def check_capacity(config, lengths: list[int], chat_overhead: int = 0) -> None:
    """ValueError when the model's configuration cannot serve a length (max_position_embeddings)."""
    limit = config.text.max_position_embeddings
    too_long = [n for n in lengths if n + chat_overhead > limit]
    if too_long:
        raise ValueError(f"the model serves at most {limit} positions (max_position_embeddings), "
                         f"but length {max(too_long)} was asked for; drop it from --lengths")


# ----------------------------------------------------------------------------- running


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def run_ruler(model, tokenizer, samples: list[dict], *, prompt_format: str = "raw", batch: int = 1,
              prefill_chunk: int = 512, progress: bool = True, max_new_tokens: int | None = None) -> list[dict]:
    """Greedy continuations for every sample → one record per sample (prediction, answers, score).

    Samples with the same generation budget run together on one Engine (continuous batching,
    `batch` rows); seconds per sample is the wall time of its group divided by its size."""
    import herd
    from tqdm import tqdm

    prompts = [prompt_ids(tokenizer, s, prompt_format) for s in samples]
    stop = sorted(set(model.config.text.eos_token_ids) | set(tokenizer.stop_tokens))
    records: list[dict | None] = [None] * len(samples)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[max_new_tokens or int(s["tokens_to_generate"])].append(i)
    bar = tqdm(total=len(samples), desc="ruler", unit="sample", disable=not progress)
    for budget, idx in groups.items():
        t0 = time.perf_counter()
        texts: dict[int, list[int]] = defaultdict(list)
        for ev in herd.generate_stream(model, [prompts[i] for i in idx], tokenizer=tokenizer, max_batch=batch,
                                       prefill_chunk=prefill_chunk, max_new_tokens=budget, temperature=0.0,
                                       stop_token_ids=stop):
            if ev.token is not None and ev.token not in stop:
                texts[ev.seq_id].append(ev.token)
            if ev.finish_reason is not None:
                bar.update()
        per = (time.perf_counter() - t0) / len(idx)
        for k, i in enumerate(idx):
            s = samples[i]
            pred = tokenizer.decode(texts[k])
            records[i] = {"index": s.get("index", i), "task": s["task"], "length": s.get("length"),
                          "depth": s.get("depth"), "prompt_tokens": len(prompts[i]), "prediction": pred,
                          "answers": s["answers"], "score": score(s["task"], pred, s["answers"]),
                          "seconds": round(per, 4)}
    bar.close()
    return records  # type: ignore[return-value]


# ----------------------------------------------------------------------------- aggregation


def effective_length(average: dict[int, float], threshold: float) -> int | None:
    """Longest length whose average, and every shorter one's, exceeds `threshold` (None: not even the first)."""
    best = None
    for n in sorted(average):
        if average[n] > threshold:
            best = n
        else:
            break
    return best


def aggregate(records: list[dict], train_length: int | None = None) -> dict:
    """Per-task × per-length mean scores (0–100), the task average per length, effective lengths."""
    cells: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        cells[r["task"]][int(r["length"])].append(r["score"])
    table = {t: {n: sum(v) / len(v) for n, v in sorted(by.items())} for t, by in cells.items()}
    lengths = sorted({n for by in table.values() for n in by})
    average = {n: sum(table[t][n] for t in table if n in table[t]) / sum(1 for t in table if n in table[t])
               for n in lengths}
    ref_length = train_length if train_length in average else (
        max((n for n in lengths if train_length is not None and n <= train_length), default=lengths[0]))
    relative = RELATIVE_THRESHOLD * average[ref_length]
    return {
        "table": table, "average": average, "samples_per_cell": {t: {n: len(v) for n, v in by.items()}
                                                                 for t, by in cells.items()},
        "effective_length": {"absolute_85.6": effective_length(average, ABSOLUTE_THRESHOLD),
                             "relative_90pct": effective_length(average, relative),
                             "reference_length": ref_length, "reference_score": average[ref_length],
                             "train_length": train_length},
    }


def format_table(summary: dict) -> str:
    """Markdown table: one row per task, one column per length, then the average row."""
    lengths = sorted({n for by in summary["table"].values() for n in by})
    head = "| task | " + " | ".join(_k(n) for n in lengths) + " |"
    lines = [head, "|---|" + "---:|" * len(lengths)]
    for t, by in summary["table"].items():
        lines.append(f"| {t} | " + " | ".join(f"{by[n]:.1f}" if n in by else "" for n in lengths) + " |")
    lines.append("| **average** | " + " | ".join(f"{summary['average'][n]:.1f}" for n in lengths) + " |")
    return "\n".join(lines)


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def plot_heatmap(records: list[dict], path, title: str = "") -> Path | None:
    """Length × depth mean score over the needle tasks → PNG (None when no needle records)."""
    from herd.data.longctx import NEEDLE_TASKS

    cells: dict[tuple[int, float], list[float]] = defaultdict(list)
    for r in records:
        if r["task"] in NEEDLE_TASKS and r.get("depth") is not None:
            cells[(int(r["length"]), float(r["depth"]))].append(r["score"])
    if not cells:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = sorted({n for n, _ in cells})
    depths = sorted({d for _, d in cells})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for (n, d), v in cells.items():
        grid[depths.index(d), lengths.index(n)] = sum(v) / len(v)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.5 + 0.35 * len(depths)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [_k(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7)
    ax.set_title(title or "needle retrieval (string_match_all, 0–100)", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def train_length_of(model_name: str) -> int | None:
    """The longest sequence length the run trained at (train_config.json: max of seq_len / curriculum)."""
    p = Path(model_name) / "train_config.json"
    if not p.is_file():
        return None
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    values = [cfg.get("seq_len")]
    if isinstance(cfg.get("curriculum"), str):  # mid-training: "512:0.5,2048:0.5" → its longest stage
        from herd.data.longctx import parse_lengths

        try:
            values += parse_lengths([s.split(":")[0] for s in cfg["curriculum"].split(",") if s.strip()])
        except ValueError:
            pass
    values = [int(v) for v in values if isinstance(v, (int, float))]
    return max(values) if values else None


# ----------------------------------------------------------------------------- CLI


def _cmd_ruler(args) -> int:
    import torch
    from tqdm import tqdm

    from herd.data.longctx import generate_samples, parse_depths, parse_lengths, parse_tasks, read_samples
    from herd.inference.loading import load_for_inference, require_tokenizer

    # everything that can be wrong with the input is checked before the model runs or a file is written
    if args.samples < 1:
        raise ValueError(f"--samples must be ≥ 1, got {args.samples}")
    if args.data:
        samples = read_samples(args.data)
        tasks = parse_tasks(sorted({s["task"] for s in samples}))
        lengths = sorted({int(s.get("length") or 0) for s in samples})
    else:
        tasks, lengths = parse_tasks(args.tasks), parse_lengths(args.lengths)
    depths = parse_depths(args.depths) if args.depths else None
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_for_inference(args.model, dtype=args.dtype, tokenizer=args.tokenizer)
    tok = require_tokenizer(tok, args.model)
    fmt = detect_format(args.model) if args.format == "auto" else args.format
    overhead = len(prompt_ids(tok, {"input": ""}, fmt)) - len(prompt_ids(tok, {"input": ""}, "raw"))
    check_capacity(model.config, lengths, max(overhead, 0))
    if not args.data:
        for task in tasks:  # a length too short for a template fails here, before any progress bar
            generate_samples(tok, task, min(lengths), 1, seed=args.seed, depths=depths, haystack=args.haystack)
        samples = []
        bar = tqdm(total=len(tasks) * len(lengths), desc="building samples", unit="cell")
        for task in tasks:
            for n in lengths:
                samples += generate_samples(tok, task, n, args.samples, seed=args.seed, depths=depths,
                                            haystack=args.haystack)
                bar.update()
        bar.close()
    train_length = args.train_length or train_length_of(args.model)

    t0 = time.perf_counter()
    records = run_ruler(model, tok, samples, prompt_format=fmt, batch=args.batch, prefill_chunk=args.prefill_chunk,
                        max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - t0
    summary = aggregate(records, train_length)
    summary.update({"model": str(args.model), "prompt_format": fmt, "template_sha256": template_hash(tok, fmt),
                    "tokenizer": tok.name, "samples": len(records), "seed": args.seed,
                    "seconds_per_sample": seconds / len(records), "peak_rss_mib": round(peak_rss_mib(), 1)})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".ruler-"))
    try:
        with open(tmp / "samples.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "table.md").write_text(format_table(summary) + "\n")
        plot_heatmap(records, tmp / "heatmap.png", f"{Path(args.model).name}: needle tasks ({fmt} prompts)")
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    eff = summary["effective_length"]
    print(format_table(summary))
    print(f"prompt format {fmt} (template {summary['template_sha256']}); effective length: "
          f"{eff['absolute_85.6']} (> 85.6), {eff['relative_90pct']} (> 90% of {eff['reference_score']:.1f} "
          f"at {eff['reference_length']}); {summary['seconds_per_sample']:.2f} s/sample, "
          f"peak RSS {summary['peak_rss_mib']:.0f} MiB; wrote {out}")
    return 0


def add_ruler_parser(sub) -> argparse.ArgumentParser:
    """`herd eval ruler MODEL ...`"""
    from herd.data.longctx import PROSE_SOURCES, TASKS

    p = sub.add_parser("ruler", help="RULER-style long-context evaluation (needles, variable tracking, ...)",
                       description=__doc__.split("\n\n")[2], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="model directory (or a preset with --tokenizer)")
    p.add_argument("--tasks", default="niah_single_1,niah_single_2,niah_multikey_1,vt",
                   help=f"comma-separated: {', '.join(TASKS)}, 'niah' or 'all'")
    p.add_argument("--lengths", default="1k,4k", help="token lengths incl. generation, e.g. 1k,4k,16k,64k")
    p.add_argument("--samples", type=int, default=10, help="samples per task and length")
    p.add_argument("--depths", default="0,25,50,75,100", help="needle depths in %% ('ruler' = RULER's 40)")
    p.add_argument("--haystack", default=None, help=f"prose haystack: {', '.join(PROSE_SOURCES)} (default bible)")
    p.add_argument("--data", default=None, help="score samples from a `herd data longctx` JSONL instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("auto", "raw", "chat"), default="auto",
                   help="prompt layout: raw (base models) or the Llama 4 chat format; auto = chat when the "
                        "model directory has a chat template")
    p.add_argument("--train-length", type=int, default=None,
                   help="length for the relative threshold (default: from the run's train_config.json)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override each task's tokens_to_generate")
    p.add_argument("--batch", type=int, default=1, help="sequences decoding at once")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill forward")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out", required=True, help="output directory (samples.jsonl, summary.json, table.md, heatmap.png)")
    p.set_defaults(func=_cmd_ruler)
    return p
