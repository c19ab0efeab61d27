"""The report card is a pure function of run directories: every row present whatever ran, the same
directories give the same bytes, values come from the files the stages wrote, and claims read
the benchmark result files (PASS / FAIL / not measured)."""

from __future__ import annotations

import json

from herd.evals.report import CLAIMS, ROWS, STAGES, build_report, write_report


def fake_run(out, results):
    (out / "environment.json").write_text(json.dumps({"commit": "abc123", "cpu": "Test CPU", "cores": 2,
                                                      "versions": {"torch": "2.13.0"}, "code_lines": 10}))
    (out / "speedrun.json").write_text(json.dumps({"stages": {
        "base": {"status": "done", "wall_s": 12.5, "cmd": "herd train ..."},
        "mid": {"status": "failed", "wall_s": 3.0, "cmd": "herd midtrain ..."},
        "rl": {"status": "not available", "cmd": "herd rl ..."}}}))
    base = out / "base"
    (base / "lm_eval" / "herd__x").mkdir(parents=True)
    (base / "config.json").write_text("{}")
    (base / "summary.json").write_text(json.dumps({"val_loss": 4.2712}))
    (base / "lm_eval" / "herd__x" / "results_2026.json").write_text(json.dumps({"results": {
        "herd_cloze_kjv": {"acc,none": 0.31, "acc_stderr,none": 0.04},
        "herd_arith": {"exact_match,first_integer": 0.12}}}))
    (base / "ruler").mkdir()
    (base / "ruler" / "summary.json").write_text(json.dumps({"effective_length": {"absolute_85.6": 512}}))
    (base / "skills").mkdir()
    (base / "skills" / "summary.json").write_text(json.dumps({"prompt_format": "raw", "digit_vqa_1": 0.9,
                                                              "digit_vqa_5": 0.0, "tool_use": 0.0, "stop_rate": None}))
    sft = out / "sft"
    (sft / "skills").mkdir(parents=True)
    (sft / "skills" / "summary.json").write_text(json.dumps({"prompt_format": "chat", "digit_vqa_1": 0.3,
                                                             "tool_use": 0.25, "tool_call_rate": 1.0, "stop_rate": 1}))
    (out / "usecases").mkdir()
    (out / "usecases" / "summary.json").write_text(json.dumps({"model": str(out / "dpo"), "ask_repo": {
        "2048": {"accuracy": 0.1, "chance": 0.08, "files": 12.0, "n": 20},
        "1024": {"accuracy": 0.25, "chance": 0.15, "files": 7.0, "n": 20}}, "summarize": {"rougeL_f1": 0.123, "n": 20}}))
    (sft / "config.json").write_text("{}")
    (sft / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval_loss": 2.5}) + "\n"
                                       + json.dumps({"step": 2, "eval_loss": 2.25}) + "\n")
    results.mkdir()
    (results / "moe_vs_dense.json").write_text(json.dumps({"commit": "def456", "claim": {"pass": True,
                                                                                         "margin": 0.05}}))
    (results / "fp8_parity.json").write_text(json.dumps({"claim": {"pass": False}}))
    (results / "metap_transfer.json").write_text(json.dumps({"best_lr": {}}))


def test_report_has_every_row_and_reads_the_stage_files(tmp_path):
    out, results = tmp_path / "run", tmp_path / "results"
    out.mkdir()
    fake_run(out, results)
    md, data = build_report(out, results)
    for label, _, _ in ROWS:
        assert f"| {label} |" in md
    for claim, _, _ in CLAIMS:
        assert f"| {claim} |" in md
    assert "| " + " | ".join(s.upper() for s in STAGES) + " |" in md
    assert data["table"]["validation loss"] == {"base": 4.2712, "mid": None, "sft": 2.25, "rl": None, "dpo": None}
    assert data["table"]["held-out cloze, KJV (acc)"]["base"] == 0.31
    assert data["table"]["reasoning: arithmetic (exact match)"]["base"] == 0.12
    assert data["table"]["RULER effective length (tokens)"]["base"] == 512
    assert "| validation loss | 4.271 | — | 2.250 | — | — |" in md
    assert "| digit VQA, 1 image (exact match) | 0.90 | — | 0.30 | — | — |" in md
    assert "| tool use: any calculator call | — | — | 1.00 | — | — |" in md
    assert "| stop rate (replies ending in a stop token) | — | — | 1.00 | — | — |" in md
    assert "BASE raw, MID —, SFT chat, RL —, DPO —" in md
    assert md.index("1024-token context") < md.index("2048-token context")
    assert "| 0.25 (chance 0.15, 7.0 files packed) |" in md and "| 0.123 |" in md and "final model (DPO)" in md
    verdicts = {c["file"]: c["result"] for c in data["claims"]}
    assert verdicts["moe_vs_dense.json"] == "PASS" and verdicts["fp8_parity.json"] == "FAIL"
    assert verdicts["metap_transfer.json"] == "measured, no verdict recorded"
    assert verdicts["dpo.json"] == "not measured"
    assert "moe_vs_dense.json @ def456, margin +0.0500" in md
    assert "commit: `abc123`" in md and "Test CPU" in md and "| total | | 15.5 |" in md


def test_same_directories_give_the_same_bytes(tmp_path):
    out, results = tmp_path / "run", tmp_path / "results"
    out.mkdir()
    fake_run(out, results)
    first = (write_report(out, results), (out / "report.json").read_bytes())
    second = (write_report(out, results), (out / "report.json").read_bytes())
    assert first == second and (out / "report.md").read_text() == first[0]


def test_an_empty_directory_still_gives_every_row(tmp_path):
    md, data = build_report(tmp_path, tmp_path / "none")
    assert all(f"| {label} |" in md for label, _, _ in ROWS)
    assert all(c["result"] == "not measured" for c in data["claims"])
    assert "| ask-repo, summarize | not run | — |" in md
