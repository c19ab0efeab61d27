"""herd score-usecases: held-out stdlib questions, a repository whose target file is always packed,
accuracy and chance per context length, ROUGE-L against the docstring's summary line.

A fake assistant that answers right (it finds the file in the prompt, or returns the docstring)
must score 1.0, and one that answers wrong 0.0; the real engine runs once through the CLI."""

from __future__ import annotations

import json
import re

from herd.data.chat_data import split_of
from herd.usecases import score


class FakeAssistant:
    """Counts words as tokens; `answer(prompt)` decides the reply."""

    def __init__(self, context: int, answer):
        self.context, self.max_new_tokens, self.answer, self.prompts = context, 16, answer, []

    @property
    def prompt_budget(self):
        return self.context - self.max_new_tokens

    def count(self, text):
        return len(text.split())

    def overhead(self, system=None):
        return 4 + (self.count(system) if system else 0)

    def ask(self, text, images=None, system=None):
        self.prompts.append(text)
        return self.answer(text)


def finder(prompt: str) -> str:
    """The path of the packed file that defines the asked function (what a perfect model says)."""
    name = re.search(r"function (\w+) defined", prompt).group(1)
    return re.search(r'<file path="([^"]+)">\ndef ' + name + r"\b", prompt).group(1)


def test_held_out_functions_are_in_the_test_split_and_unambiguous():
    fns = score.held_out_functions(8)
    assert len(fns) == 8 and all(split_of(f"{f['path']}.{f['name']}") == "test" for f in fns)
    names = [f["name"] for f in score._stdlib_functions()]
    assert all(names.count(f["name"]) == 1 for f in fns)
    assert all(len(f["doc"].split()) >= 3 for f in score.held_out_functions(5, need_doc=True))


def test_ask_repo_packs_the_target_and_scores_the_first_cited_path():
    targets = score.held_out_functions(4)
    pool = list(score._stdlib_functions()[:400])
    for context in (300, 900):
        right = score.score_ask_repo(FakeAssistant(context, finder), targets, pool)
        assert all(r["target_packed"] and r["score"] == 1.0 for r in right)
        wrong = score.score_ask_repo(FakeAssistant(context, lambda p: "no idea"), targets, pool)
        assert all(r["score"] == 0.0 and r["cited"] == [] for r in wrong)
    s = score.aggregate(right + score.score_ask_repo(FakeAssistant(300, finder), targets, pool))
    assert s["ask_repo"]["300"]["accuracy"] == 1.0 and s["ask_repo"]["900"]["accuracy"] == 1.0
    assert s["ask_repo"]["900"]["files"] > s["ask_repo"]["300"]["files"] > 1  # longer context, more to read
    assert s["ask_repo"]["900"]["chance"] < s["ask_repo"]["300"]["chance"] < 1


def test_summaries_see_code_without_the_docstring_and_score_rouge_l():
    fns = score.held_out_functions(3, need_doc=True)
    a = FakeAssistant(4000, lambda p: next(f["doc"] for f in fns if f"def {f['name']}(" in p))
    records = score.score_summaries(a, fns)
    assert [r["score"] for r in records] == [1.0, 1.0, 1.0]
    assert all(f["doc"] not in p for f, p in zip(fns, a.prompts))  # the answer is not in the prompt
    half = score.score_summaries(FakeAssistant(4000, lambda p: "unrelated words only"), fns)
    assert all(r["score"] < 0.5 for r in half)


def test_cli_scores_a_tiny_model(model_dir, tmp_path, capsys):
    from herd.cli import main

    out = tmp_path / "uc"
    assert main(["score-usecases", str(model_dir), "--out", str(out), "--lengths", "384,512", "--limit", "1",
                 "--max-new-tokens", "4"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s["ask_repo"]) == {"384", "512"} and s["summarize"]["n"] == 1
    assert len((out / "records.jsonl").read_text().splitlines()) == 3


def test_cli_refuses_a_context_too_short(model_dir, tmp_path, capsys):
    from herd.cli import main

    assert main(["score-usecases", str(model_dir), "--out", str(tmp_path), "--lengths", "64"]) == 2
    assert "context lengths must each exceed" in capsys.readouterr().err
