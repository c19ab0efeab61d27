"""`herd rl`: online RL from a model directory (flags generated from RLConfig's fields)."""

from __future__ import annotations

import argparse


def add_rl_subcommand(subparsers) -> None:
    from herd.train.flags import add_dataclass_arguments
    from herd.train.rl.learner import RLConfig

    p = subparsers.add_parser(
        "rl", help="online RL (GRPO) on verifiable prompts, keeping the medium-to-hard ones; async Ray workers",
        description="GRPO-family online RL from --init on verifiable chat tasks: G completions per prompt from "
        "herd's Engine in Ray rollout-worker actors, the learner a Ray actor too (--workers 0: both in this process), "
        "group-normalised advantages, clipped "
        "token-level loss against the behaviour log-probs, samples at most --max-staleness policy versions old; a "
        "prompt pool keeps prompts whose pass rate is in (0, tau], drops zero-advantage groups and refills. Writes "
        "metrics.jsonl (TRL's metric names), rl.png, crash-safe checkpoints (--resume) and the final model to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_arguments(p, RLConfig)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from herd.train.flags import config_from_args
    from herd.train.rl.learner import RLConfig, train

    cfg = config_from_args(RLConfig, args)
    cfg.validate()
    if cfg.workers == 0:
        summary = train(cfg)
    else:
        from herd.train.rl.launch import launch

        summary = launch(cfg)
    print("done: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return 0
