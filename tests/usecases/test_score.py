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
    names = [f["name"] for f in score.stdlib_functions()]
    assert all(names.count(f["name"]) == 1 for f in fns)
    assert all(len(f["doc"].split()) >= 3 for f in score.held_out_functions(5, need_doc=True))


def test_ask_repo_packs_the_target_and_scores_the_first_cited_path():
    targets = score.held_out_functions(4)
    pool = list(score.stdlib_functions()[:400])
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


# ----------------------------------------------------------------------------- the SFT mixture teaches these turns
def test_sft_ask_repo_dialogs_are_the_turn_ask_repo_builds(tmp_path):
    """An SFT ask_repo example, written out as a repository and asked through herd.usecases.ask_repo,
    gives the model exactly the system and user text it trained on; its reference answer scores 1."""
    from herd.data.usecase_data import ask_repo_examples
    from herd.usecases.ask_repo import ask_repo

    for k, ex in enumerate(ask_repo_examples(6, seed=3)):
        system, user, reply = (m["content"] for m in ex["messages"])
        root = tmp_path / f"repo{k}"
        for path, body in re.findall(r'<file path="([^"]+)">\n(.*?)\n</file>\n', user, flags=re.S):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(body + "\n")
        seen = []
        a = FakeAssistant(10**6, lambda p: reply)
        a.ask = lambda text, images=None, system=None: seen.append((system, text)) or reply
        question = re.search(r"Question: (.*)\n", user).group(1)
        res = ask_repo(a, root, question)
        assert seen == [(system, user)]
        assert res["cited"][0] == ex["answer"] == reply and user.count("<file ") >= 1


def test_sft_summarize_dialogs_are_the_turn_summarize_builds():
    from herd.data.usecase_data import summarize_examples, without_docstring
    from herd.usecases.summarize import summarize_text

    by_name = {f"def {f['name']}(": f for f in score.stdlib_functions()}
    for ex in summarize_examples(5, seed=1):
        user, doc = ex["messages"][0]["content"], ex["messages"][1]["content"]
        fn = next(f for k, f in by_name.items() if k in user)
        a = FakeAssistant(10**6, lambda p: doc)
        res = summarize_text(a, without_docstring(fn), progress=False)
        assert a.prompts == [user] and res["summary"] == fn["doc"] == doc


def test_sft_use_case_items_never_ask_about_the_scored_functions():
    from herd.data.chat_data import split_of
    from herd.data.usecase_data import ask_repo_examples, summarize_examples

    scored = {f"{f['path']}.{f['name']}" for f in score.held_out_functions(10**6)}
    items = ask_repo_examples(400) + summarize_examples(400)
    train = {ex["key"] for ex in items if split_of(ex["key"]) == "train"}
    assert len(train) > 300 and not train & scored
    assert {ex["key"] for ex in items} & scored  # they exist, and land in the test split like score's


def test_herd_data_sft_writes_the_use_case_tasks(tmp_path):
    from herd.data.chat_data import TASKS, build, verify
    from herd.train.chat_rows import check_sft_row

    assert {"ask_repo", "summarize"} <= set(TASKS)  # in the default mixture (herd data sft, the speedrun)
    summary = build(tmp_path, per_task=20, tasks=("ask_repo", "summarize"), progress=False)
    assert {t: sum(c.values()) for t, c in summary["tasks"].items()} == {"ask_repo": 20, "summarize": 20}
    rows = [json.loads(x) for s in ("train", "val", "test") for x in (tmp_path / f"{s}.jsonl").read_text().splitlines()]
    for r in rows:
        check_sft_row(r)
        assert verify(r, r["messages"][-1]["content"]) == (1.0 if r["task"] == "ask_repo" else None)
