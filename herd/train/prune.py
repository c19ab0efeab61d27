"""Model-judged difficulty pruning of SFT data (Llama 4's "lightweight SFT").

Meta: "we removed more than 50% of our data tagged as easy by using Llama models as a judge"
(95% for Behemoth), so the small SFT budget goes to what the model cannot already do. Here the
judge is the model being tuned:

  * verifiable items (a `verifier`, herd.data.chat_data.verify): sample k replies with herd's
    inference engine (temperature 1, `--prune-k`), difficulty = 1 − pass rate (the fraction of
    the k replies the verifier accepts), ties broken by the reference loss;
  * everything else: the mean token loss (nats) of the reference assistant tokens, the masked
    SFT loss of the example itself.

The two scales are not comparable, so examples are ranked *within each task* and the easiest
`prune` fraction of every task is dropped (the task mix stays the same). `--prune-mode random`
drops a random subset of the same size instead (the ablation of benchmarks/sft_pruning.py).

Writes OUT/prune/: scores.jsonl (id, task, pass_rate, loss, difficulty rank, kept), kept.txt,
dropped.txt, difficulty.png (histogram per task of kept vs dropped scores).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from herd.train import distributed
from herd.train.chat_rows import IGNORE, pack_rows, resolve_images


@torch.no_grad()
def reference_losses(model, examples, device, seq_len: int, pad_id: int, batch_rows: int = 8,
                     progress: bool = True) -> list[float]:
    """Mean next-token loss (nats) on each example's assistant tokens (float32; eval mode)."""
    model.eval()
    out = []
    it = range(0, len(examples), batch_rows)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="prune: reference loss", unit="batch", dynamic_ncols=True)
    for i in it:
        chunk = examples[i:i + batch_rows]
        # one example per row: the loss of each row is one example's
        rows = [pack_rows([ex], seq_len, pad_id) for ex in chunk]
        ids = torch.cat([r.input_ids for r in rows]).to(device)
        labels = torch.cat([r.labels for r in rows]).to(device)
        tiles = [r.pixel_values for r in rows if r.pixel_values is not None]
        px = torch.cat(tiles).to(device) if tiles else None
        logits = model(ids, pixel_values=px).float()  # [b, T, V]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none",
                                                ignore_index=IGNORE).view(labels.shape)
        n = (labels != IGNORE).sum(1).clamp(min=1)
        out += (nll.sum(1) / n).tolist()
    model.train()
    return out


def prompt_of(tokenizer, example, vision_config):
    """(prompt ids ending in the assistant header, tiles) for the example without its last reply."""
    from herd.chat import encode_messages

    base = Path(example.row.get("_where", "./x:0").rsplit(":", 1)[0]).parent
    msgs = resolve_images(example.row["messages"][:-1], base)
    ids, tiles = encode_messages(tokenizer, msgs, add_generation_prompt=True, vision_config=vision_config)
    return ids, (torch.cat(tiles) if tiles else None)


@torch.no_grad()
def sample_replies(model, tokenizer, prompts: list, k: int, max_new: int, temperature: float = 1.0,
                   seed: int = 0, progress: bool = True, desc: str = "sampling", details: bool = False) -> list[list]:
    """k sampled replies (text, up to the end-of-turn token) per (ids, tiles) prompt, through herd.Engine.
    details: (text, stopped) pairs instead, stopped = the reply ended with an end-of-turn token."""
    from herd.inference.engine import Engine
    from herd.inference.sampling import SamplingParams

    engine = Engine(model, max_batch=16, tokenizer=tokenizer)
    out = [[[] for _ in range(k)] for _ in prompts]
    stopped = [[False] * k for _ in prompts]
    for i, (ids, px) in enumerate(prompts):
        for j in range(k):
            engine.add(ids, SamplingParams(max_new_tokens=max_new, temperature=temperature, seed=seed + 1000 * i + j),
                       pixel_values=px, seq_id=(i, j))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts) * k, desc=desc, unit="reply", dynamic_ncols=True)
    for ev in engine.run():
        i, j = ev.seq_id
        if ev.token is not None:
            out[i][j].append(ev.token)
        if ev.finish_reason is not None:
            stopped[i][j] = ev.finish_reason == "stop"
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    stops = set(model.config.text.eos_token_ids)
    texts = [[tokenizer.decode([t for t in toks if t not in stops]) for toks in row] for row in out]
    return [list(zip(t, s)) for t, s in zip(texts, stopped)] if details else texts


def score_examples(model, tokenizer, examples, cfg, device, pad_id: int) -> list[dict]:
    """One score record per example: pass_rate (verifiable items, else None) and reference loss."""
    from herd.data.chat_data import verify

    progress = cfg.progress
    losses = reference_losses(model, examples, device, cfg.seq_len, pad_id, progress=progress)
    verifiable = [i for i, ex in enumerate(examples) if ex.row.get("verifier")]
    rates: dict[int, float] = {}
    if verifiable and cfg.prune_k > 0:
        vision = model.config.vision
        prompts = [prompt_of(tokenizer, examples[i], vision) for i in verifiable]
        replies = sample_replies(model, tokenizer, prompts, cfg.prune_k, cfg.prune_max_new, 1.0, cfg.seed,
                                 progress, desc="prune: pass@k")
        for i, reps in zip(verifiable, replies):
            rates[i] = sum(verify(examples[i].row, r) for r in reps) / len(reps)
    return [{"id": ex.id, "task": ex.row.get("task", "?"), "pass_rate": rates.get(i), "loss": round(losses[i], 5)}
            for i, ex in enumerate(examples)]


def choose(scores: list[dict], fraction: float, mode: str = "model", seed: int = 0) -> list[bool]:
    """Which examples to keep: per task, drop the easiest `fraction` (highest pass rate, then lowest
    loss) — or, mode "random", a random subset of the same size per task."""
    keep = [True] * len(scores)
    by_task: dict[str, list[int]] = {}
    for i, s in enumerate(scores):
        by_task.setdefault(s["task"], []).append(i)
    rng = random.Random(seed)
    for task, idx in sorted(by_task.items()):
        n_drop = min(int(round(fraction * len(idx))), len(idx) - 1)  # every task keeps at least one example
        if mode == "random":
            order = idx[:]
            rng.shuffle(order)
        else:  # easiest first: verified-often first, then low reference loss
            order = sorted(idx, key=lambda i: (-(scores[i]["pass_rate"] if scores[i]["pass_rate"] is not None else -1),
                                               scores[i]["loss"]))
        for i in order[:n_drop]:
            keep[i] = False
    return keep


def plot_difficulty(scores: list[dict], keep: list[bool], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({s["task"] for s in scores})
    cols = min(4, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), dpi=100, squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        idx = [i for i, s in enumerate(scores) if s["task"] == task]
        verified = [i for i in idx if scores[i]["pass_rate"] is not None]
        shown = verified or idx  # a task mixing verifiable and free items (code_qa): its pass rates
        val = (lambda i: scores[i]["pass_rate"]) if verified else (lambda i: scores[i]["loss"])
        kept = [val(i) for i in shown if keep[i]]
        dropped = [val(i) for i in shown if not keep[i]]
        ax.hist([kept, dropped], bins=12, stacked=True, color=["#1f77b4", "#bbbbbb"], label=["kept", "dropped"])
        ax.set_title(task if len(shown) == len(idx) else f"{task} ({len(shown)} of {len(idx)} verifiable)", fontsize=9)
        ax.set_xlabel("pass rate (pass@k)" if verified else "reference loss (nats/token)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("SFT data difficulty as judged by the model being tuned", fontsize=10)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def prune_examples(model, tokenizer, examples, cfg, out_dir: Path, env):
    """Score and choose on rank 0, write the report, every rank reads the same choice → (kept examples, summary)."""
    from herd.data.longctx import write_jsonl_atomic

    pad = tokenizer.special_tokens.get("<|finetune_right_pad|>", tokenizer.special_tokens["<|eot|>"])
    out_dir = Path(out_dir)
    cached = out_dir / "scores.jsonl"
    scores = None
    if cfg.resume and cached.exists():  # a resumed run keeps the selection it started with
        scores = [json.loads(x) for x in cached.read_text().splitlines() if x.strip()]
        if [s["id"] for s in scores] != [e.id for e in examples]:
            scores = None
    if scores is None and cfg.prune_scores:
        scores = [json.loads(x) for x in Path(cfg.prune_scores).read_text().splitlines() if x.strip()]
        scores = [{k: v for k, v in s.items() if k != "kept"} for s in scores]
        if [s["id"] for s in scores] != [e.id for e in examples]:
            raise ValueError(f"--prune-scores {cfg.prune_scores}: scored other examples than --data")
    if scores is None and env.is_main:  # rank 0 scores; the others read its file (one selection for all)
        if cfg.prune_mode == "random":
            scores = [{"id": e.id, "task": e.row.get("task", "?"), "pass_rate": None, "loss": 0.0} for e in examples]
        else:
            scores = score_examples(model, tokenizer, examples, cfg, env.device, pad)
    keep = choose(scores, cfg.prune, cfg.prune_mode, cfg.seed) if scores is not None else None
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic([{**s, "kept": k} for s, k in zip(scores, keep)], cached)
        (out_dir / "kept.txt").write_text("".join(s["id"] + "\n" for s, k in zip(scores, keep) if k))
        (out_dir / "dropped.txt").write_text("".join(s["id"] + "\n" for s, k in zip(scores, keep) if not k))
        plot_difficulty(scores, keep, out_dir / "difficulty.png")
    distributed.barrier(env)
    if keep is None:
        rows = [json.loads(x) for x in cached.read_text().splitlines() if x.strip()]
        keep = [bool(r["kept"]) for r in rows]
    kept = [e for e, k in zip(examples, keep) if k]
    report = {"pruned": len(examples) - len(kept), "kept": len(kept), "prune": cfg.prune, "prune_mode": cfg.prune_mode}
    if env.is_main and cfg.progress:
        print(f"pruning ({cfg.prune_mode}, {cfg.prune:.0%} per task): kept {len(kept)} of {len(examples)} → {out_dir}")
    return kept, report
