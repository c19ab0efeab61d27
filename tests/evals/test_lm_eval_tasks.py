"""herd's offline lm-eval tasks (herd/evals/tasks/): they load without a network, a model that
knows every answer scores 1.0 on each (so the prompts, targets, filters and metrics fit
together), herd's adapter runs them all end to end, and the shipped JSON is what build.py makes."""

from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.model import LM  # noqa: E402

TASKS = ["herd_arith", "herd_cloze_kjv", "herd_cloze_shakespeare", "herd_needle", "herd_ppl"]


def task_manager():
    from lm_eval.tasks import TaskManager

    from herd.evals.lm_eval_adapter import TASKS_DIR

    return TaskManager(include_path=TASKS_DIR)


class Oracle(LM):
    """Knows each document's answer: gold continuation log p 0, others -10; generates the answer."""

    def loglikelihood(self, requests, disable_tqdm=False):
        out = []
        for r in requests:
            gold = r.doc["choices"][r.doc["label"]]
            out.append((0.0, True) if r.args[1] == gold else (-10.0, False))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        return [-float(len(r.args[0])) for r in requests]  # 1 nat per character

    def generate_until(self, requests, disable_tqdm=False):
        return [f" {r.doc['answer']}." for r in requests]


def test_a_model_that_knows_the_answers_scores_one_on_every_task():
    res = lm_eval.simple_evaluate(model=Oracle(), tasks=["herd"], task_manager=task_manager(), limit=10,
                                  bootstrap_iters=0)["results"]
    assert sorted(res) == TASKS
    for t in ("herd_arith", "herd_needle"):
        assert next(v for k, v in res[t].items() if k.startswith("exact_match,")) == 1.0
    for t in ("herd_cloze_kjv", "herd_cloze_shakespeare"):
        assert res[t]["acc,none"] == 1.0
    assert res["herd_ppl"]["bits_per_byte,none"] == pytest.approx(1 / torch.log(torch.tensor(2.0)).item(), rel=1e-6)


def test_herd_adapter_runs_every_task(tmp_path):
    from tests.conftest import random_model_dir

    torch.set_num_threads(1)
    random_model_dir(tmp_path, ["Calculate 5 - 3. The special magic number for apple is 1234567.\n" * 50], 512)
    res = lm_eval.simple_evaluate(model="herd", model_args=f"pretrained={tmp_path},max_length=512,batch_size=4",
                                  tasks=["herd"], task_manager=task_manager(), limit=2, bootstrap_iters=0)
    assert sorted(res["results"]) == TASKS
    assert 0 <= res["results"]["herd_cloze_kjv"]["acc,none"] <= 1
    assert res["results"]["herd_ppl"]["bits_per_byte,none"] > 0


@pytest.mark.parametrize("name", ["arith", "needle", "cloze_shakespeare"])
def test_shipped_task_data_is_what_build_makes(name):
    from herd.evals.tasks import build

    make = {"arith": lambda: build.arith(4), "needle": lambda: build.needle(5),
            "cloze_shakespeare": lambda: build.cloze("shakespeare", 1)}[name]
    assert make() == json.loads((build.DATA / f"{name}.json").read_text())
