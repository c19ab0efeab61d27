"""herd.evals: evaluations that run a model through herd's inference engine and score it.

    herd eval ruler runs/tiny --tasks niah_single_1,vt --lengths 1k,4k --samples 20 --out runs/tiny/ruler

Layer: above training and inference (it imports herd.inference, herd.data and herd.chat; nothing
below imports it). Each eval is one module that yields one record per sample (idx, prediction,
answers, score) and aggregates them in a separate function, so a trainer can call it mid-run and
the CLI on its own:

    ruler   RULER-style long-context retrieval, tracing and aggregation on synthetic haystacks
            (herd/data/longctx.py): per-task × per-length table, effective length, heatmap.
    skills  digit VQA with 1 and 5 images, calculator tool use and stop rate on held-out items of
            the SFT generators (herd/data/chat_data.py), raw or chat prompts.

`add_eval_subcommand(subparsers)` registers `herd eval ...`; each eval adds its own subcommand.
"""

from __future__ import annotations

import argparse


def add_eval_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `herd eval` and its evaluations on an argparse subparsers object."""
    from herd.evals.ruler import add_ruler_parser
    from herd.evals.skills import add_skills_parser

    parser = subparsers.add_parser("eval", help="evaluate a model (RULER long-context suite, chat skills)")
    sub = parser.add_subparsers(dest="eval_command", metavar="{ruler,skills}")
    sub.required = True
    add_ruler_parser(sub)
    add_skills_parser(sub)
    return parser
