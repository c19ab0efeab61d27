"""Loaders for herd's offline lm-eval tasks: each YAML's `custom_dataset: !function utils.NAME`
reads data/NAME.json (built by herd/evals/tasks/build.py) into a one-split DatasetDict."""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).with_name("data")


def _load(name: str):
    import datasets

    items = json.loads((DATA / f"{name}.json").read_text())
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(items)})


def cloze_shakespeare(**kwargs):
    return _load("cloze_shakespeare")


def cloze_kjv(**kwargs):
    return _load("cloze_kjv")


def ppl(**kwargs):
    return _load("ppl")


def arith(**kwargs):
    return _load("arith")


def needle(**kwargs):
    return _load("needle")
