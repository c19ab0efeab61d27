"""The iRoPE claim, side by side: does a model trained at length L retrieve needles at 4×, 16×, 64× L?

    OMP_NUM_THREADS=1 python benchmarks/irope_extrapolation.py --out benchmarks/results/irope \\
        [--arms a,b,c,d] [--seeds 0,1] [--train-length 512] [--pre-steps 150] [--mid-steps 150] \\
        [--mults 1,4,16,64] [--samples 6]

Claim (Llama 4 model card / blog): interleaved attention layers without positional embeddings
(NoPE, global) between chunked-local RoPE layers, plus inference-time temperature scaling of the
NoPE layers' attention, let a model trained at 256K serve 10M. Arms, same budget and data:

    a  iRoPE + temperature   RoPE layers chunked-local (chunk L/4), every 4th layer NoPE + global,
                             attention temperature tuning on NoPE layers (floor_scale = chunk, attn_scale 0.1)
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
    """The model config of an arm (everything but position handling identical across arms)."""
    from herd.config import ModelConfig, TextConfig

    chunk = max(16, L // 4)
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden, intermediate_size_mlp=2 * hidden,
              num_hidden_layers=layers, num_attention_heads=max(2, hidden // 16), num_key_value_heads=max(1, hidden // 32),
              head_dim=16, num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
              use_qk_norm=True, rope_theta=10000.0, rope_scaling=None, bos_token_id=bos, eos_token_id=[eos],
              pad_token_id=None, tie_word_embeddings=False, max_position_embeddings=max_len,
              floor_scale=chunk, attn_scale=0.1)
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


def plot(results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 3.6), sharey=True)
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
                ax.plot(xs, ys, "o-", label=f"{arm}: {ARMS[arm]}")
                ax.fill_between(xs, lo, hi, alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.mults, [f"{m}×" for m in args.mults])
        ax.set_xlabel(f"context length / training length (L = {args.train_length})")
        ax.set_title(task)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("string_match_all (0–100)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.mults = [int(m) for m in args.mults.split(",")]
    torch.set_num_threads(args.threads)

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
