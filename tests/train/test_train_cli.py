"""`herd train`'s flags, generated from TrainConfig (herd.train.flags): the same flags, defaults,
types and choices as the hand-written parser they replaced, help from the fields, and the
Makefile's `make train` recipe still parses."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from herd.train.cli import add_train_subcommand
from herd.train.trainer import TrainConfig

# The hand-written parser's flags (commit c469259): flag → (default, type, choices), or the bool action.
BEFORE = {
    "--preset": ("tiny", "str", None),
    "--out": ("runs/tiny", "str", None),
    "--width": (None, "int", None),
    "--layers": (None, "int", None),
    "--max-steps": (300, "int", None),
    "--resume": "store_true",
    "--stop-after": (None, "int", None),
    "--batch-size": (8, "int", None),
    "--seq-len": (256, "int", None),
    "--grad-accum": (1, "int", None),
    "--lr": (0.003, "float", None),
    "--schedule": ("cosine", "str", ("cosine", "wsd", "constant")),
    "--warmup": (30, "int", None),
    "--min-lr-ratio": (0.1, "float", None),
    "--weight-decay": (0.1, "float", None),
    "--clip": (1.0, "float", None),
    "--no-bf16": "store_false",
    "--no-document-mask": "store_false",
    "--no-metap": "store_false",
    "--metap-base-width": (256, "int", None),
    "--vision-lr-mult": (1.0, "float", None),
    "--fp8": (None, "str", ("tensorwise", "rowwise")),
    "--balance": ("bias", "str", ("bias", "aux", "none")),
    "--bias-rate": (0.001, "float", None),
    "--aux-coef": (0.01, "float", None),
    "--align-steps": (0, "int", None),
    "--align-start": (0, "int", None),
    "--align-freeze": ("lm", "str", ("lm", "none")),
    "--eval-every": (50, "int", None),
    "--eval-batches": (8, "int", None),
    "--log-every": (10, "int", None),
    "--ckpt-every": (100, "int", None),
    "--keep": (3, "int", None),
    "--seed": (0, "int", None),
    "--tokenizer": (None, "str", None),
    "--mixture": (None, "parse_weights", None),
    "--data-cache": (None, "str", None),
    "--max-docs": (None, "int", None),
    "--teacher": (None, "str", None),
    "--distill-weight": ("gap", "str", None),
    "--distill-temperature": (1.0, "float", None),
    "--teacher-topk": (None, "int", None),
    "--teacher-topk-mode": ("renorm", "str", ("renorm", "tail")),
    "--teacher-targets": (None, "str", None),
    "--parallel": ("fsdp", "str", ("fsdp", "ddp")),
    "--threads": (None, "int", None),
    "--no-progress": "store_false",
}


def train_parser() -> argparse.ArgumentParser:
    sub = argparse.ArgumentParser(prog="herd").add_subparsers()
    add_train_subcommand(sub)
    return sub.choices["train"]


def flag_table(parser) -> dict:
    out = {}
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            out[a.option_strings[0]] = "store_true" if isinstance(a, argparse._StoreTrueAction) else "store_false"
        else:
            out[a.option_strings[0]] = (a.default, getattr(a.type, "__name__", "str") if a.type else "str",
                                        tuple(a.choices) if a.choices else None)
    return out


def test_train_flags_are_the_hand_written_parsers():
    assert flag_table(train_parser()) == BEFORE


def test_every_train_flag_has_help_from_the_config_fields():
    text = train_parser().format_help()
    for flag in BEFORE:
        assert flag in text
    # help that lived in the CLI now lives on the field
    assert "model preset (tiny, small, ...)" in text and "FP8 matmuls" in text and "at MetaP's base width" in text
    undocumented = [a.option_strings[0] for a in train_parser()._actions if not a.help]
    assert set(undocumented) <= {"--metap-base-width", "--bias-rate", "--aux-coef"}, undocumented


def test_no_flags_give_the_config_defaults():
    args = train_parser().parse_args([])
    from herd.train.flags import config_from_args

    assert config_from_args(TrainConfig, args) == TrainConfig()


def test_make_train_recipe_parses():
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    recipe = re.search(r"^TRAIN_ARGS \?= (.*)$", makefile, re.M).group(1)
    from herd.train.flags import config_from_args

    cfg = config_from_args(TrainConfig, train_parser().parse_args(shlex.split(recipe)))
    cfg.validate()
    assert (cfg.preset, cfg.max_steps, cfg.align_start, cfg.align_steps) == ("tiny", 600, 150, 50)
    assert (cfg.vision_lr_mult, cfg.align_freeze, cfg.out) == (0.0, "none", "runs/tiny")


def test_mixture_flag_parses_weights_and_bad_choices_are_refused():
    p = train_parser()
    assert p.parse_args(["--mixture", "shakespeare=0.5,python=0.5"]).mixture == {"shakespeare": 0.5, "python": 0.5}
    for argv in (["--fp8", "int4"], ["--align-freeze", "vision"], ["--teacher-topk-mode", "top"]):
        with pytest.raises(SystemExit):
            p.parse_args(argv)
