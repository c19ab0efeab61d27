"""Flags generated from a config dataclass: names, defaults, help, bools, choices, tuples, optionals."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from herd.train.flags import add_dataclass_arguments, config_from_args


@dataclass
class Cfg:
    max_steps: int = field(default=3, metadata={"help": "steps to run"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast"})
    resume: bool = False
    mode: Literal["a", "b"] = "a"
    betas: tuple[float, float] = (0.9, 0.95)
    init: str | None = None
    extra: dict = field(default_factory=dict)
    hidden: int = field(default=1, metadata={"cli": False})


def parse(argv):
    p = argparse.ArgumentParser()
    add_dataclass_arguments(p, Cfg)
    return p, config_from_args(Cfg, p.parse_args(argv))


def test_defaults_round_trip_and_help_comes_from_the_field():
    p, cfg = parse([])
    assert cfg == Cfg()
    text = p.format_help()
    assert "--max-steps" in text and "steps to run" in text and "--no-bf16" in text and "--hidden" not in text


def test_every_kind_of_field_parses():
    _, cfg = parse(["--max-steps", "7", "--no-bf16", "--resume", "--mode", "b", "--betas", "0.8", "0.9",
                    "--init", "runs/x"])
    assert cfg == Cfg(max_steps=7, bf16=False, resume=True, mode="b", betas=(0.8, 0.9), init="runs/x")


def test_a_choice_outside_the_literal_is_refused():
    with pytest.raises(SystemExit):
        parse(["--mode", "c"])
