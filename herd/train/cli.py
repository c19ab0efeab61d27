"""`herd train`: command-line front end of herd.train.trainer (also `torchrun -m herd train`)."""

from __future__ import annotations

import argparse


def add_train_subcommand(subparsers) -> None:
    """`herd train`: flags generated from TrainConfig's fields (herd.train.flags), help included."""
    from herd.data.cli import parse_weights
    from herd.train.flags import add_dataclass_arguments
    from herd.train.trainer import TrainConfig

    p = subparsers.add_parser(
        "train",
        help="pre-train a model on the bundled text + image data",
        description="Pre-train a Llama 4 preset on the bundled data (Shakespeare, the KJV Bible, CPython "
        "sources and docs, handwritten digits with captions). Writes metrics.jsonl, loss.png, "
        "crash-safe checkpoints and the final Hugging Face model directory to --out. Multi-process: "
        "torchrun --nproc_per_node N -m herd train ... (gloo on CPU, FSDP2).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # betas stays off the command line, as it always was for herd train
    add_dataclass_arguments(p, TrainConfig, skip=("betas",), overrides={"mixture": {"type": parse_weights}})
    p.set_defaults(func=_run)


def _run(args) -> int:
    from herd.train.flags import config_from_args
    from herd.train.trainer import TrainConfig, train

    summary = train(config_from_args(TrainConfig, args))
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
