"""herd speedrun: stages run in order, finished ones are skipped on rerun, failed ones rerun,
missing subcommands are "not available", and the --quick pipeline writes a report with every row."""

from __future__ import annotations

import json

import pytest

from herd import speedrun as sr


def test_available_knows_herds_subcommands():
    assert sr.available(["train", "--preset", "tiny"]) and sr.available(["guard", "train-prompt"])
    assert not sr.available(["no-such-command"]) and not sr.available(["guard", "no-such-guard"])


def test_stages_are_skipped_when_done_and_rerun_when_failed(tmp_path, monkeypatch):
    def fake_stages(out, sizes):  # real herd commands: one that works, one that fails, one that does not exist
        return [sr.Stage("one", ["params", "tiny", "--json"], "one"),
                sr.Stage("two", ["params", "no-such-preset"], "two"),
                sr.Stage("three", ["no-such-command"], "three")]

    monkeypatch.setattr(sr, "stages", fake_stages)
    monkeypatch.setattr(sr, "environment", lambda: {"commit": "test"})
    state = sr.speedrun(tmp_path, quick=True, progress=False)
    assert {k: v["status"] for k, v in state["stages"].items()} == {"one": "done", "two": "failed",
                                                                    "three": "not available"}
    assert state["stages"]["two"]["rc"] == 2 and state["stages"]["one"]["wall_s"] > 0
    state = sr.speedrun(tmp_path, quick=True, progress=False)  # rerun: "one" is skipped, "two" runs again
    runs = lambda name: (tmp_path / "logs" / f"{name}.log").read_text().count("$ ")  # noqa: E731
    assert runs("one") == 1 and runs("two") == 2
    assert "| one | done |" in (tmp_path / "report.md").read_text()


@pytest.mark.timeout(2400)  # 26 stages = 26 processes: ~3 min idle, over 15 min on a machine shared 9 ways
def test_quick_speedrun_writes_a_report_with_every_row(tmp_path):
    from herd.evals.report import ROWS

    state = sr.speedrun(tmp_path / "run", quick=True, progress=False)
    md = (tmp_path / "run" / "report.md").read_text()
    assert all(f"| {label} |" in md for label, _, _ in ROWS)
    assert state["stages"]["base"]["status"] == "done"
    for name in ("tokenizer", "base", "sft_data", "skills_base", "usecases"):
        assert f"| {name} | done |" in md
    data = json.loads((tmp_path / "run" / "report.json").read_text())
    for row in ("digit VQA, 1 image (exact match)", "tool use: right calculator call"):
        assert data["table"][row]["base"] is not None  # the skills stage's numbers reach the table
    assert "BASE raw" in md and set(data["usecases"]["ask_repo"]) == {"256", "512"}
