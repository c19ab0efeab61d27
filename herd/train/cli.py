"""`herd train`: command-line front end of herd.train.trainer (also `torchrun -m herd train`)."""

from __future__ import annotations

import argparse


def add_train_subcommand(subparsers) -> None:
    from herd.data.cli import parse_weights
    from herd.train.trainer import TrainConfig

    d = TrainConfig()
    p = subparsers.add_parser(
        "train",
        help="pre-train a model on the bundled text + image data",
        description="Pre-train a Llama 4 preset on the bundled data (Shakespeare, the KJV Bible, CPython "
        "sources and docs, handwritten digits with captions). Writes metrics.jsonl, loss.png, "
        "crash-safe checkpoints and the final Hugging Face model directory to --out. Multi-process: "
        "torchrun --nproc_per_node N -m herd train ... (gloo on CPU, FSDP2).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", default=d.preset, help="model preset (tiny, small, ...)")
    p.add_argument("--out", default=d.out, help="run directory")
    p.add_argument("--width", type=int, default=None, help="tiny recipe at this hidden size (multiple of 128)")
    p.add_argument("--layers", type=int, default=None, help="tiny recipe with this many layers")
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this step; --resume continues the same schedule")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch in sequences")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (at MetaP's base width)")
    p.add_argument("--schedule", choices=["cosine", "wsd", "constant"], default=d.schedule)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clipping")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 matmuls instead of bf16 autocast")
    p.add_argument("--no-document-mask", dest="document_mask", action="store_false",
                   help="ablation: let attention cross the boundaries of packed documents")
    p.add_argument("--no-metap", dest="metap", action="store_false",
                   help="ablation: standard init (std 0.02) and one learning rate for all parameters")
    p.add_argument("--metap-base-width", type=int, default=d.metap_base_width)
    p.add_argument("--vision-lr-mult", type=float, default=d.vision_lr_mult,
                   help="learning-rate multiplier of the vision tower and projector (on top of MetaP's)")
    p.add_argument("--fp8", choices=["tensorwise", "rowwise"], default=None,
                   help="FP8 matmuls (e4m3 forward, e5m2 gradients; emulated on CPU)")
    p.add_argument("--balance", choices=["bias", "aux", "none"], default=d.balance,
                   help="MoE load balancing: aux-loss-free bias, switch auxiliary loss, or none")
    p.add_argument("--bias-rate", type=float, default=d.bias_rate)
    p.add_argument("--aux-coef", type=float, default=d.aux_coef)
    p.add_argument("--align-steps", type=int, default=d.align_steps,
                   help="vision alignment stage: steps on image-caption data with the language model frozen")
    p.add_argument("--align-start", type=int, default=d.align_start,
                   help="step at which the alignment stage starts (after text pre-training)")
    p.add_argument("--align-freeze", choices=["lm", "none"], default=d.align_freeze,
                   help="what the alignment stage freezes: the language model, or nothing")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-batches", type=int, default=d.eval_batches)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--keep", type=int, default=d.keep, help="checkpoints to keep")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (trained into --out if absent)")
    p.add_argument("--mixture", type=parse_weights, default=None,
                   help="data mixture as token shares, e.g. shakespeare=0.3,python=0.4,digits=0.3"
                        "; unset (None): herd.data.DEFAULT_WEIGHTS")
    p.add_argument("--data-cache", default=None, help="tokenised-data cache directory (default OUT/data_cache)")
    p.add_argument("--max-docs", type=int, default=None, help="use only the first N documents per data source")
    p.add_argument("--teacher", default=None,
                   help="codistillation: a model directory (same tokenizer) whose next-token distribution "
                        "trains this model alongside the data (herd.train.distill)")
    p.add_argument("--distill-weight", default=d.distill_weight,
                   help="weight w of the teacher's soft targets (1 − w on the data's labels): a number in [0, 1], "
                        "linear:A:B over training, or gap[:TAU], dynamic: w = 1 − exp(−(CE_student − CE_teacher)/TAU)")
    p.add_argument("--distill-temperature", type=float, default=d.distill_temperature,
                   help="softmax temperature T of teacher and student in the soft part (scaled by T²)")
    p.add_argument("--teacher-topk", type=int, default=None,
                   help="keep only the teacher's K most likely tokens per position (see --teacher-topk-mode)")
    p.add_argument("--teacher-topk-mode", choices=["renorm", "tail"], default=d.teacher_topk_mode,
                   help="renormalise the teacher over its top K, or keep the rest as one bucket")
    p.add_argument("--teacher-targets", default=None,
                   help="offline teacher targets: a directory of top-K log-probs for this data stream, "
                        "precomputed there (once) when absent")
    p.add_argument("--parallel", choices=["fsdp", "ddp"], default=d.parallel)
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from herd.train.trainer import TrainConfig, train

    fields = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    summary = train(cfg)
    if summary:
        print("done: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return 0


def add_posttrain_subcommands(subparsers) -> None:
    """`herd sft` and `herd dpo`: flags generated from SFTConfig / DPOConfig (herd.train.flags)."""
    from herd.train.dpo import DPOConfig
    from herd.train.flags import add_dataclass_arguments
    from herd.train.sft import SFTConfig

    p = subparsers.add_parser(
        "sft", help="supervised fine-tuning on chat data (assistant-only loss, packing, difficulty pruning)",
        description="Fine-tune a model directory on messages JSONL (herd data sft --out DIR writes it): loss on "
        "assistant tokens only (end-of-turn included), packed rows with per-example attention and positions, the "
        "easiest --prune fraction dropped as judged by the model itself (pass@k / reference loss). Same checkpoints, "
        "--resume and torchrun as herd train.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_arguments(p, SFTConfig)
    p.set_defaults(func=_run_sft)
    p = subparsers.add_parser(
        "dpo", help="direct preference optimisation on prompt/chosen/rejected pairs (TRL formats)",
        description="DPO (sigmoid, or IPO) from a model directory, which is also the frozen reference; reference "
        "log-probs are computed once and cached; metrics under TRL's names (rewards/chosen, rewards/margins, ...).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("action", nargs="?", choices=["train", "pairs"], default="train",
                   help="train (default), or pairs: build on-policy pairs from --data's verifiable prompts into "
                        "OUT/pairs.jsonl (a verified-correct sample as chosen, a wrong one as rejected)")
    add_dataclass_arguments(p, DPOConfig)
    p.add_argument("--k", type=int, default=4, help="pairs: samples per prompt")
    p.add_argument("--max-new", type=int, default=24, help="pairs: tokens per sample")
    p.add_argument("--temperature", type=float, default=1.0, help="pairs: sampling temperature")
    p.add_argument("--limit", type=int, default=None, help="pairs: use the first N verifiable prompts")
    p.add_argument("--use-reference", action="store_true",
                   help="pairs: when no sample is right, use the reference answer as chosen")
    p.set_defaults(func=_run_dpo)


def _run_sft(args) -> int:
    from herd.train.flags import config_from_args
    from herd.train.sft import SFTConfig, sft

    summary = sft(config_from_args(SFTConfig, args))
    if summary:
        print("done: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return 0


def _run_dpo(args) -> int:
    from herd.train.dpo import DPOConfig, build_pairs, dpo
    from herd.train.flags import config_from_args

    if args.action == "pairs":
        if not args.init or not args.data:
            raise ValueError("herd dpo pairs needs --init DIR and --data FILE (messages JSONL with verifiers)")
        counts = build_pairs(args.init, args.data, args.out, args.k, args.max_new, args.temperature, args.limit,
                             args.seed, args.use_reference, args.progress)
        print(f"wrote {args.out}/pairs.jsonl: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        return 0
    summary = dpo(config_from_args(DPOConfig, args))
    if summary:
        print("done: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return 0
