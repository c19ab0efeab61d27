"""The `herd` command line: one subcommand per job. `herd --help` lists them.

Each subcommand lives in a small `_cmd_*` function here or registers itself from its own module;
heavy imports (torch, transformers) happen inside the command, so `herd --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_params(args) -> int:
    from pathlib import Path

    from herd.config import ModelConfig
    from herd.params import count_params, params_table
    from herd.presets import PRESETS

    if args.model in PRESETS and not Path(args.model).is_dir():
        from herd.presets import get_config

        config = get_config(args.model)
    elif Path(args.model).is_dir():
        config = ModelConfig.from_json(args.model)
    else:
        raise ValueError(f"{args.model!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory")
    counts = count_params(config)
    if args.json:
        print(json.dumps(counts, indent=2))
    else:
        print(params_table(args.model, counts))
    return 0


def _cmd_demo(args) -> int:
    from herd.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="herd",
        description="herd: the whole Llama 4 system in plain PyTorch (models, training, inference, safety, serving).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "params",
        help="total and active parameter counts of a preset or model directory",
        description=(
            "Print total and active-per-token parameter counts with a breakdown, without allocating weights. "
            "'Active' counts what one text token touches: embeddings, LM head, all attention, norms and routers, "
            "the shared expert and dense MLPs, and top_k of the routed experts per MoE layer; the vision tower "
            "and projector are counted in 'total' only. Presets: scout, maverick, behemoth, guard4, tiny, small."
        ),
    )
    p.add_argument("model", help="preset name or a directory with config.json")
    p.add_argument("--json", action="store_true", help="print a JSON object (integer keys total, active, breakdown)")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser(
        "demo",
        help="build a model, run text and an image through it, print its parameter table",
        description="Build a model (random weights unless a directory is given), run a text prompt and an image "
        "through it (early fusion), and print its parameter table and a few greedy next tokens.",
    )
    p.add_argument("--model", default="tiny", help="preset name or model directory (default: tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    for register in _optional_subcommands():
        register(sub)
    return parser


def _optional_subcommands():
    """Subcommands that live in their own modules (kept out of the import path of --help)."""
    from herd.data import add_data_subcommand
    from herd.evals import add_eval_subcommand
    from herd.inference.cli import add_inference_subcommands
    from herd.safety.cli import add_guard_subcommand
    from herd.serve.cli import add_serve_subcommand
    from herd.tokenizer_train import add_tokenizer_subcommand
    from herd.train.cli import add_posttrain_subcommands, add_train_subcommand
    from herd.train.midtrain import add_midtrain_subcommand
    from herd.train.rl.cli import add_rl_subcommand
    from herd.speedrun import add_speedrun_subcommands
    from herd.usecases import add_usecase_subcommands

    return [add_tokenizer_subcommand, add_data_subcommand, add_train_subcommand, add_inference_subcommands,
            add_serve_subcommand, add_eval_subcommand, add_guard_subcommand,
            add_midtrain_subcommand, add_posttrain_subcommands, add_rl_subcommand, add_usecase_subcommands,
            add_speedrun_subcommands]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"herd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
