"""The iRoPE claim, side by side: does a model trained at length L retrieve needles at 4×, 16×, 64× L?

    OMP_NUM_THREADS=1 python benchmarks/irope_extrapolation.py --out benchmarks/results/irope \\
        [--arms a,b,c,d] [--seeds 0,1] [--train-length 512] [--pre-steps 150] [--mid-steps 150] \\
        [--mults 1,4,16,64] [--samples 6]

Claim (Llama 4 model card / blog): interleaved attention layers without positional embeddings
(NoPE, global) between chunked-local RoPE layers, plus inference-time temperature scaling of the
NoPE layers' attention, let a model trained at 256K serve 10M. Arms, same budget and data:

    a  iRoPE + temperature   RoPE layers chunked-local (chunk L/4), every 4th layer NoPE + global,
                             attention temperature tuning on NoPE layers (floor_scale = L, attn_scale 0.1)
    b  iRoPE, no temperature the same without temperature tuning
    c  RoPE everywhere       RoPE on every layer, full causal attention (the classic design)
    d  NoPE everywhere       no positional encoding at all, full causal attention (optional)

Each arm × seed: pre-training at L/2 on the bundled text mixture (herd.train.loop with the
pre-training objective, NextTokenLoss), then mid-training (herd.train.midtrain, the real stage)
at L on long synthetic documents mixed with the text. Evaluation (herd.evals.ruler.run_ruler:
the Engine, chunked prefill, string_match_all) on niah_single_1 (noise haystack, 7-digit value)
and niah_multikey_1 (prose haystack, 3 distractor keys) at each multiple of L. Output: results
JSON (every cell, every seed), a markdown table (mean ± half-range over seeds) and a plot.

The model is tiny (hidden 64, 4 layers, 4 experts, a 2048-token BPE trained on the bundled text)
so the whole ablation runs on one CPU thread; whatever the result, it is reported as measured.

floor_scale. Meta's reference forward (llama-models `models/llama4/model.py`, `Attention.forward`;
transformers `modeling_llama4.py`, `Llama4TextAttention.forward`) scales NoPE-layer queries by
log(floor((pos+1)/floor_scale)+1)·attn_scale+1 with no training/inference switch, and the Llama 4
blog calls it "inference time temperature scaling". With floor_scale = 8192 = the chunk = the
length of Meta's pre-training sequences, it is the identity on every position a pre-training
sequence has (up to its final token) and only grows beyond: at 256K it is 1.35, at 10M 1.71.
The faithful tiny analogue is floor_scale = L, the training length: the temperature is applied
in the forward pass exactly as Meta's, is 1 on every position the loss sees in training, and is
1.16 / 1.28 / 1.42 at 4× / 16× / 64× L. (An earlier run used floor_scale = chunk = L/4, which
turns the temperature on inside the training window from step 0; arm a then never learned
retrieval. That run is kept in BENCHMARKS.md as measured.) A consequence for the passkey task:
arms a and b train bit-identical networks (the loss sits on positions < L - 1, where the scale is
exactly 1; tests/evals/test_irope_extrapolation.py checks it), so passkey mode trains that network
once per seed and evaluates it under both configs. The arms then differ only at inference, which
is the claim being tested.

At that budget every arm scored 0 even at 1× L, so `--task passkey` (see passkey_batch) trains the
same arm configs from scratch on a closed-vocabulary passkey task, loss on the answer digits only:

    OMP_NUM_THREADS=1 python benchmarks/irope_extrapolation.py --task passkey --out benchmarks/results/irope/passkey-L64-floorL \
        --arms a,b,c --seeds 0,1 --train-length 64 --steps 1500 --batch-tokens 1024 --samples 32

`--task multikey` is RULER's niah_multikey_1 in the same vocabulary (4 named needles, the query names
one). `--result benchmarks/results/irope_extrapolation.json [--card-with OTHER_RUN_DIR]` writes the
report card's result file: the RULER-style score (mean over the tasks' run directories given) of
arm a against arm c at 4× L.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

ARMS = {"a": "iRoPE + temperature", "b": "iRoPE, no temperature", "c": "RoPE everywhere (full causal)",
        "d": "NoPE everywhere (full causal)"}
TASKS = ("niah_single_1", "niah_multikey_1")


def arm_config(arm: str, vocab: int, bos: int, eos: int, L: int, hidden: int, layers: int, max_len: int):
    """The model config of an arm (everything but position handling identical across arms).

    L is the longest training length: chunk = L/4 (at least 16), floor_scale = L (see the module
    docstring: Meta's 8192 is their pre-training length and chunk).
    """
    from herd.config import ModelConfig, TextConfig

    chunk = max(16, L // 4)
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden, intermediate_size_mlp=2 * hidden,
              num_hidden_layers=layers, num_attention_heads=max(2, hidden // 16), num_key_value_heads=max(1, hidden // 32),
              head_dim=16, num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
              use_qk_norm=True, rope_theta=10000.0, rope_scaling=None, bos_token_id=bos, eos_token_id=[eos],
              pad_token_id=None, tie_word_embeddings=False, max_position_embeddings=max_len,
              floor_scale=L, attn_scale=0.1)
    irope = [0 if (i + 1) % 4 == 0 else 1 for i in range(layers)]
    if arm == "a":
        kw.update(attention_chunk_size=chunk, no_rope_layers=irope, attn_temperature_tuning=True)
    elif arm == "b":
        kw.update(attention_chunk_size=chunk, no_rope_layers=irope, attn_temperature_tuning=False)
    elif arm == "c":
        kw.update(attention_chunk_size=None, no_rope_layers=[1] * layers, attn_temperature_tuning=False)
    elif arm == "d":
        kw.update(attention_chunk_size=None, no_rope_layers=[0] * layers, attn_temperature_tuning=False)
    else:
        raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    text = TextConfig(**kw)
    return ModelConfig(text=text, vision=None, tie_word_embeddings=False)


def pretrain(model_config, tok, out: Path, args, seed: int) -> None:
    """Pre-training at L/2 on the text mixture: the shared loop with pre-training's objective."""
    from herd.data import DataConfig, build_datasets
    from herd.model.llama4 import Llama4
    from herd.train import distributed, metap
    from herd.train.loop import LoopConfig, build_optimizer, run, validation_loss
    from herd.train.trainer import NextTokenLoss

    if (out / "model.safetensors").exists():
        return
    env = distributed.setup()
    cfg = LoopConfig(out=str(out), max_steps=args.pre_steps, lr=args.lr, warmup=10, eval_every=args.pre_steps,
                     ckpt_every=args.pre_steps, seed=seed, progress=False, bf16=False, log_every=10)
    torch.manual_seed(seed)
    model = Llama4(model_config)
    metap.init_metap(model, metap.MetaPConfig(base_width=cfg.metap_base_width),
                     generator=torch.Generator().manual_seed(seed))
    seq = args.train_length // 2
    dc = DataConfig(seq_len=seq, batch_size=max(1, args.batch_tokens // seq), seed=seed, val_batches=2,
                    weights={"shakespeare": 0.3, "bible": 0.3, "docs": 0.2, "python": 0.2}, progress=False,
                    max_docs=args.max_docs)
    train, val = build_datasets(tok, dc)
    objective = NextTokenLoss(env.device, tok.bos_id)
    model, opt = build_optimizer(model, cfg, env, verbose=False)
    run(cfg, model, opt, objective, train, env, tokenizer=tok, evals=[validation_loss(objective, val, env, cfg)],
        name="pretrain")
    (out / "train_config.json").write_text(json.dumps({"seq_len": seq, "mixture": dc.weights}))


def evaluate(model_dir: Path, args, seed: int) -> list[dict]:
    """niah_single_1 / niah_multikey_1 at every multiple of L → one record per sample."""
    import herd
    from herd.data.longctx import generate_samples
    from herd.evals.ruler import run_ruler

    tok = herd.load_tokenizer(model_dir)
    model = herd.load_model(model_dir, dtype=torch.float32)
    model.config.text.max_position_embeddings = max(model.config.text.max_position_embeddings,
                                                    max(args.mults) * args.train_length)
    records = []
    for task in TASKS:
        for m in args.mults:
            n = args.train_length * m
            samples = generate_samples(tok, task, n, args.samples, seed=1000 + seed, depths=[10, 30, 50, 70, 90])
            for r in run_ruler(model, tok, samples, progress=False, max_new_tokens=args.new_tokens):
                r["mult"] = m
                records.append(r)
            print(f"    {task} at {m}× L ({n} tokens): "
                  f"{sum(r['score'] for r in records if r['task'] == task and r['mult'] == m) / args.samples:.0f}",
                  flush=True)
    return records


def summarise(results: dict, args) -> str:
    lines = ["| arm | task | " + " | ".join(f"{m}× L" for m in args.mults) + " |",
             "|---|---|" + "---:|" * len(args.mults)]
    for arm in args.arms:
        for task in TASKS:
            cells = []
            for m in args.mults:
                per_seed = []
                for seed in args.seeds:
                    recs = [r for r in results.get(f"{arm}/{seed}", []) if r["task"] == task and r["mult"] == m]
                    if recs:
                        per_seed.append(sum(r["score"] for r in recs) / len(recs))
                if len(per_seed) == 1:
                    cells.append(f"{per_seed[0]:.0f} (1 seed)")
                elif per_seed:
                    mean = sum(per_seed) / len(per_seed)
                    half = (max(per_seed) - min(per_seed)) / 2
                    cells.append(f"{mean:.0f} ± {half:.0f}")
                else:
                    cells.append("")
            lines.append(f"| {arm}: {ARMS[arm]} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, args, path: Path, ylabel: str = "string_match_all (0–100)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 3.6), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, task in zip(axes, TASKS):
        for arm in args.arms:
            xs, ys, lo, hi = [], [], [], []
            for m in args.mults:
                vals = []
                for seed in args.seeds:
                    recs = [r for r in results.get(f"{arm}/{seed}", []) if r["task"] == task and r["mult"] == m]
                    if recs:
                        vals.append(sum(r["score"] for r in recs) / len(recs))
                if vals:
                    xs.append(m)
                    ys.append(sum(vals) / len(vals))
                    lo.append(min(vals))
                    hi.append(max(vals))
            if xs:
                line, = ax.plot(xs, ys, "o-", label=f"{arm}: {ARMS[arm]} (mean)")
                ax.fill_between(xs, lo, hi, alpha=0.15, color=line.get_color())
                for seed in args.seeds:  # thin line per seed: a mean over seeds that learn or not hides the split
                    per = [sum(r["score"] for r in recs) / len(recs) for m in xs
                           if (recs := [r for r in results.get(f"{arm}/{seed}", []) if r["task"] == task and r["mult"] == m])]
                    if len(per) == len(xs) and len(args.seeds) > 1:
                        ax.plot(xs, per, "--", lw=0.8, alpha=0.6, color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.mults, [f"{m}×" for m in args.mults])
        ax.set_xlabel(f"context length / training length (L = {args.train_length})")
        ax.set_title(task)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel + ("; dashed: one seed" if len(args.seeds) > 1 else ""))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- passkey mode: a focused synthetic task in which a tiny model does learn to retrieve -------------------
#
# The text-mixture ablation above scored 0 in every arm even at 1× L (hidden 64, 200 mid-training steps:
# the model learned the answer format and wrote a memorised number). `--task passkey` removes everything
# but retrieval, so the arms can be told apart at a CPU budget:
#
#   vocabulary (32 ids): 0–9 the digits (one token each), 10 BOS, 11 KEY, 12 QUERY, 13 EOS, 14–31 noise
#   row [L]:  BOS noise … KEY d1 d2 d3 d4 noise … QUERY d1 d2 d3 d4
#             the needle at a uniform depth, noise i.i.d. uniform over the 18 noise ids
#   loss:     cross-entropy on the 4 answer digits only (the positions after QUERY)
#   score:    exact match of the 4 greedy digits (= every teacher-forced argmax right), 0–100
#
# Same model configs as the text ablation (arm_config), trained from scratch at L, evaluated at m·L
# with longer noise haystacks. Source of the task: the passkey retrieval test of Mohtashami & Jaggi
# 2023 ("Landmark Attention") and RULER's niah_single_1, reduced to a closed vocabulary.

PK_DIGITS, PK_BOS, PK_KEY, PK_QUERY, PK_EOS, PK_NOISE0, PK_VOCAB = 10, 10, 11, 12, 13, 14, 32
PK_N = 4  # digits per passkey


def passkey_batch(batch: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """→ input_ids [B, length], labels [B, length] (next-token targets, -100 except the answer digits)."""
    ids = torch.randint(PK_NOISE0, PK_VOCAB, (batch, length), generator=gen)  # [B, T] noise
    ids[:, 0] = PK_BOS
    keys = torch.randint(0, PK_DIGITS, (batch, PK_N), generator=gen)  # [B, 4]
    q = length - PK_N - 1  # QUERY position; answer digits at q+1 … q+4
    span = q - (PK_N + 1) - 1  # needle start ∈ [1, q - 5]
    starts = 1 + (torch.rand(batch, generator=gen) * span).long()  # [B]
    rows = torch.arange(batch)
    ids[rows, starts] = PK_KEY
    for j in range(PK_N):
        ids[rows, starts + 1 + j] = keys[:, j]
    ids[:, q] = PK_QUERY
    ids[:, q + 1:] = keys
    labels = torch.full_like(ids, -100)
    labels[:, q:q + PK_N] = keys  # the target of position t is token t+1
    return ids, labels


# Multi-key (`--task multikey`, RULER's niah_multikey_1 in the same closed vocabulary): 4 needles
# `KEY name d1 d2 d3 d4` with distinct names (ids 32–39), one in each quarter of the haystack; the row
# ends `QUERY name d1 d2 d3 d4` for one of them, so the answer digits sit where passkey's do.
MK_KEYS, MK_NAME0, MK_NAMES, MK_VOCAB = 4, 32, 8, 40


def multikey_batch(batch: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """→ input_ids [B, length], labels [B, length] (-100 except the queried needle's digits)."""
    need = PK_N + 2  # KEY name d1 … d4
    q = length - PK_N - 2  # QUERY at q, the queried name at q + 1, its digits at q + 2 … length - 1
    seg = (q - 1) // MK_KEYS  # needle j lies inside [1 + j·seg, 1 + (j+1)·seg)
    if seg < need:
        raise ValueError(f"multikey rows need at least {MK_KEYS * need + PK_N + 3} tokens, got {length}")
    ids = torch.randint(PK_NOISE0, PK_VOCAB, (batch, length), generator=gen)  # [B, T] noise
    ids[:, 0] = PK_BOS
    names = torch.argsort(torch.rand(batch, MK_NAMES, generator=gen), -1)[:, :MK_KEYS] + MK_NAME0  # [B, 4]
    values = torch.randint(0, PK_DIGITS, (batch, MK_KEYS, PK_N), generator=gen)  # [B, 4, 4]
    rows = torch.arange(batch)
    for j in range(MK_KEYS):
        starts = 1 + j * seg + (torch.rand(batch, generator=gen) * (seg - need + 1)).long()  # [B]
        ids[rows, starts] = PK_KEY
        ids[rows, starts + 1] = names[:, j]
        for d in range(PK_N):
            ids[rows, starts + 2 + d] = values[:, j, d]
    target = torch.randint(0, MK_KEYS, (batch,), generator=gen)  # [B] which needle is asked for
    ids[:, q] = PK_QUERY
    ids[:, q + 1] = names[rows, target]
    ids[:, q + 2:] = values[rows, target]
    labels = torch.full_like(ids, -100)
    labels[:, q + 1:q + 1 + PK_N] = values[rows, target]
    return ids, labels


PK_TASKS = {"passkey": (PK_VOCAB, passkey_batch), "multikey": (MK_VOCAB, multikey_batch)}  # task → (vocab, rows)


def passkey_config(arm: str, L: int, hidden: int, layers: int, max_len: int, task: str = "passkey"):
    return arm_config(arm, PK_TASKS[task][0], PK_BOS, PK_EOS, L, hidden, layers, max_len)


@torch.no_grad()
def passkey_score(model, length: int, samples: int, seed: int, batch: int = 8,
                  task: str = "passkey") -> tuple[float, float]:
    """(exact match of all 4 digits, per-digit accuracy), both 0–100, over `samples` rows of `length` tokens."""
    gen = torch.Generator().manual_seed(10_000 + seed + length)
    hits = digits = 0
    for i in range(0, samples, batch):
        b = min(batch, samples - i)
        ids, labels = PK_TASKS[task][1](b, length, gen)
        logits = model(ids, logits_slice=slice(length - PK_N - 1, length - 1))  # [B, 4, V]
        right = logits.argmax(-1) == labels[:, -PK_N - 1:-1]  # [B, 4]
        hits += int(right.all(-1).sum())
        digits += int(right.sum())
    return 100.0 * hits / samples, 100.0 * digits / (samples * PK_N)


# Arms whose training is bit-identical to another's (temperature is 1 below floor_scale = L): trained once.
TRAINS_AS = {"a": "b"}


def passkey_train(arm: str, seed: int, args):
    """Train one arm from scratch on passkey rows of length L → (model, 1×-L curve, seconds)."""
    import math

    from herd.model.llama4 import build_model

    L = args.train_length
    cfg = passkey_config(arm, L, args.hidden, args.layers, max(args.mults) * L, args.task)
    model = build_model(cfg, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    batch = max(1, args.batch_tokens // L)
    curve = []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        ids, labels = PK_TASKS[args.task][1](batch, L, gen)
        loss = model(ids, labels=labels) / (batch * PK_N)  # summed CE over the answer digits → mean
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            acc, digit = passkey_score(model, L, args.samples, seed, task=args.task)
            model.train()
            curve.append({"step": step, "loss": round(loss.item(), 4), "acc_1x": acc, "digit_acc_1x": digit})
            print(f"  {arm}/s{seed} step {step}: answer loss {loss.item():.3f}, 1× L exact match {acc:.0f}, "
                  f"digits {digit:.0f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    return model, curve, round(time.perf_counter() - t0, 1)


def passkey_arm(arm: str, seed: int, args, trained: dict) -> dict:
    """Score one arm at every multiple of L; `trained` caches (model, curve, seconds) per training arm."""
    from herd.model.llama4 import build_model

    L = args.train_length
    twin = TRAINS_AS.get(arm, arm)
    if (twin, seed) not in trained:
        trained[(twin, seed)] = passkey_train(twin, seed, args)
    net, curve, seconds = trained[(twin, seed)]
    model = build_model(passkey_config(arm, L, args.hidden, args.layers, max(args.mults) * L, args.task), seed=seed)
    model.load_state_dict(net.state_dict())  # the same weights under this arm's position handling
    model.eval()
    t0 = time.perf_counter()
    cells, digit_cells = {}, {}
    for m in args.mults:
        cells[str(m)], digit_cells[str(m)] = passkey_score(model, m * L, args.samples, seed, task=args.task)
        print(f"  {arm}/s{seed} {m}× L ({m * L} tokens): exact {cells[str(m)]:.0f}, digits {digit_cells[str(m)]:.0f} "
              "(chance 10)", flush=True)
    return {"curve": curve, "scores": cells, "digit_scores": digit_cells, "trained_as": twin,
            "train_seconds": seconds, "eval_seconds": round(time.perf_counter() - t0, 1)}


def passkey_main(args) -> int:
    """Every arm × seed not yet in out/ (one JSON each, so arms can run as parallel processes) → table + plot."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        trained = {}  # (training arm, seed) → (model, curve, seconds): arms a and b share one training run
        for arm in args.arms:
            path = out / f"{arm}-s{seed}.json"
            if path.exists():
                continue
            print(f"arm {arm} ({ARMS[arm]}), seed {seed}", flush=True)
            rec = passkey_arm(arm, seed, args, trained)
            rec.update(arm=arm, seed=seed, L=args.train_length, steps=args.steps, lr=args.lr, hidden=args.hidden,
                       layers=args.layers, batch_tokens=args.batch_tokens, samples=args.samples,
                       floor_scale=args.train_length, chunk=max(16, args.train_length // 4), task=args.task)
            path.write_text(json.dumps(rec, indent=1))
    results = {}
    for path in sorted(out.glob("?-s*.json")):
        rec = json.loads(path.read_text())
        results[f"{rec['arm']}/{rec['seed']}"] = [{"task": args.task, "mult": int(m), "score": v}
                                                  for m, v in rec["scores"].items()]
    global TASKS
    TASKS = (args.task,)
    args.arms = [a for a in ARMS if any(k.startswith(a + "/") for k in results)]
    args.seeds = sorted({int(k.split("/")[1]) for k in results})
    table = summarise(results, args)
    (out / "table.md").write_text(table + "\n")
    plot(results, args, out / f"irope_{args.task}.png", ylabel="4-digit exact match (0–100)")
    print(table)
    if args.result:
        card = passkey_report_card([out] + [Path(d) for d in args.card_with], args.mults)
        Path(args.result).write_text(json.dumps(card, indent=1) + "\n")
        print(f"claim: {card['claim']} → {args.result}")
    return 0


def passkey_report_card(dirs: list[Path], mults: list[int]) -> dict:
    """The report card's result file (herd.evals.report CLAIMS) from passkey / multikey run directories.

    RULER's score at a length is the mean over its tasks; here over passkey (single needle) and
    multikey, each the mean over seeds. pass = arm a's score at 4× L above arm c's (RoPE everywhere);
    margin = the difference in points (0–100); smoke when an arm has fewer than 2 seeds in a task."""
    import platform
    import subprocess

    runs = [dict(task="passkey") | json.loads(p.read_text()) for d in dirs for p in sorted(Path(d).glob("?-s*.json"))]
    table = {}
    for task in sorted({r["task"] for r in runs}):
        table[task] = {}
        for arm in sorted({r["arm"] for r in runs if r["task"] == task}):
            mine = [r for r in runs if r["task"] == task and r["arm"] == arm]
            table[task][arm] = {str(m): {"mean": sum(r["scores"][str(m)] for r in mine) / len(mine),
                                         "min": min(r["scores"][str(m)] for r in mine),
                                         "max": max(r["scores"][str(m)] for r in mine),
                                         "per_seed": {str(r["seed"]): r["scores"][str(m)] for r in mine}}
                                for m in mults}
    if any(arm not in table[task] for task in table for arm in "ac"):
        raise ValueError("the report card needs arms a and c in every task")
    ruler = {arm: {str(m): sum(table[t][arm][str(m)]["mean"] for t in table) / len(table) for m in mults}
             for arm in ARMS if all(arm in table[t] for t in table)}
    a4, c4 = ruler["a"]["4"], ruler["c"]["4"]
    seeds = {t: {arm: len(table[t][arm][str(mults[0])]["per_seed"]) for arm in table[t]} for t in table}
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "") if Path("/proc/cpuinfo").exists() else platform.processor()
    ref = next(r for r in runs if r["arm"] == "a" and "floor_scale" in r)  # settings every run shares
    return {"claim": {"pass": a4 > c4, "margin": a4 - c4,
                      "smoke": min(n for per in seeds.values() for n in per.values()) < 2,
                      "measure": "mean over tasks (" + ", ".join(table) + ") of the 4-digit exact match (0-100) "
                                 "at 4x the training length, each the mean over seeds",
                      "irope_temperature_4x": a4, "rope_4x": c4},
            "commit": commit or None, "machine": cpu,
            "setup": {**{k: ref.get(k) for k in ("L", "steps", "lr", "hidden", "layers", "batch_tokens", "samples",
                                                 "floor_scale", "chunk")},
                      "attn_scale": 0.1, "mults": mults, "seeds": seeds},
            "arms": ARMS, "ruler_score": ruler, "table": table,
            "runs": [{k: r.get(k) for k in ("task", "arm", "seed", "scores", "digit_scores", "curve", "trained_as")}
                     for r in runs]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/irope")
    p.add_argument("--arms", default="a,b,c")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--train-length", type=int, default=512)
    p.add_argument("--pre-steps", type=int, default=150)
    p.add_argument("--mid-steps", type=int, default=150)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--long-ratio", type=float, default=0.7)
    p.add_argument("--mid-tasks", default="niah_single_1,niah_single_2,niah_multikey_1,niah_multikey_2",
                   help="synthetic task families of the mid-training mixture")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--mults", default="1,4,16,64")
    p.add_argument("--samples", type=int, default=6, help="samples per task, length, arm and seed")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per sample (a 7-digit value fits)")
    p.add_argument("--max-docs", type=int, default=200, help="documents per text source")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--task", choices=("text", "passkey", "multikey"), default="text",
                   help="text: pre-training + herd midtrain + RULER (the original ablation); passkey: the focused "
                        "synthetic retrieval task trained from scratch (see passkey_batch)")
    p.add_argument("--steps", type=int, default=1200, help="passkey: training steps")
    p.add_argument("--eval-every", type=int, default=200, help="passkey: steps between 1× L scores")
    p.add_argument("--result", default=None,
                   help="passkey: also write the report card's result file (e.g. benchmarks/results/irope_extrapolation.json)")
    p.add_argument("--card-with", default="", help="passkey: more run directories (other tasks) for --result, comma-separated")
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.mults = [int(m) for m in args.mults.split(",")]
    args.card_with = [d for d in args.card_with.split(",") if d]
    torch.set_num_threads(args.threads)
    if args.task in PK_TASKS:
        return passkey_main(args)

    import herd
    from herd.data.loader import training_texts
    from herd.tokenizer_train import train_tokenizer
    from herd.train.midtrain import MidtrainConfig, midtrain

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out / f"tokenizer{args.vocab}"
    tok = herd.load_tokenizer(tok_dir) if (tok_dir / "tokenizer.json").exists() else \
        train_tokenizer(list(training_texts(limit=100)), args.vocab, tok_dir)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    L = args.train_length
    for seed in args.seeds:  # every arm at one seed first: a cut-short run still compares the arms
        for arm in args.arms:
            key = f"{arm}/{seed}"
            if key in results:
                continue
            t0 = time.perf_counter()
            print(f"arm {arm} ({ARMS[arm]}), seed {seed}", flush=True)
            cfg = arm_config(arm, tok.vocab_size, tok.bos_id, tok.eos_id, L, args.hidden, args.layers,
                             max(args.mults) * L)
            pre, mid = out / f"{arm}-s{seed}-pre", out / f"{arm}-s{seed}-mid"
            pretrain(cfg, tok, pre, args, seed)
            if not (mid / "model.safetensors").exists():
                midtrain(MidtrainConfig(init=str(pre), out=str(mid), curriculum=f"{L}:1", long_ratio=args.long_ratio,
                                        tasks=args.mid_tasks,
                                        batch_tokens=args.batch_tokens, max_steps=args.mid_steps, lr=args.lr,
                                        warmup=10, eval_every=args.mid_steps, ckpt_every=args.mid_steps,
                                        seed=seed, bf16=False, progress=False, max_docs=args.max_docs))
            results[key] = evaluate(mid, args, seed)
            results_path.write_text(json.dumps(results))
            print(f"  done in {time.perf_counter() - t0:.0f}s", flush=True)
    table = summarise(results, args)
    (out / "table.md").write_text(table + "\n")
    plot(results, args, out / "irope_extrapolation.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
