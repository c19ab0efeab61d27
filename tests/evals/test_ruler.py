"""RULER evaluation (herd/evals/ruler.py): scoring on hand-made predictions, effective length,
and `herd eval ruler` end to end on a tiny random model at small lengths."""

from __future__ import annotations

import json

import pytest
import torch

import herd
from herd.cli import main
from herd.evals.ruler import (aggregate, effective_length, format_table, prompt_ids, run_ruler, string_match_all,
                              string_match_part)
from tests.conftest import random_model_dir


def test_string_match_all_scores_containment_not_wording():
    assert string_match_all("7341295", ["7341295"]) == 100.0
    assert string_match_all("The special magic number is 7341295, I am sure.", ["7341295"]) == 100.0  # extra words
    assert string_match_all("the answer: FAT-COPPER", ["fat-copper"]) == 100.0  # case-insensitive
    assert string_match_all("7341296", ["7341295"]) == 0.0  # one wrong digit scores nothing
    assert string_match_all("1111111 and 3333333", ["1111111", "2222222", "3333333", "4444444"]) == 50.0
    assert string_match_all("", ["1"]) == 0.0


def test_string_match_part_needs_any_reference():
    assert string_match_part("Paris, France", ["paris", "lyon"]) == 100.0
    assert string_match_part("Rome", ["paris", "lyon"]) == 0.0


def test_effective_length_uses_both_thresholds():
    records = []
    for n, s in [(256, 100.0), (1024, 90.0), (4096, 84.0), (16384, 95.0), (65536, 70.0)]:
        records += [{"task": "niah_single_1", "length": n, "score": s}, {"task": "vt", "length": n, "score": s}]
    summary = aggregate(records, train_length=4096)
    assert summary["average"][1024] == 90.0
    # absolute: 84 ≤ 85.6 at 4096 ends it, even though 16384 recovers
    assert summary["effective_length"]["absolute_85.6"] == 1024
    # relative: 90% of the score at the training length (0.9 × 84 = 75.6) holds up to 16384
    assert summary["effective_length"]["relative_90pct"] == 16384
    assert summary["effective_length"]["reference_score"] == 84.0
    assert effective_length({256: 50.0}, 85.6) is None
    assert "| niah_single_1 | 100.0 | 90.0 | 84.0 | 95.0 | 70.0 |" in format_table(summary)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random text model (vocab 512, chunk 16, NoPE every 4th) with a matching trained tokenizer."""
    from herd.data.loader import training_texts

    return random_model_dir(tmp_path_factory.mktemp("ruler-model"), list(training_texts(limit=5)), 512, seed=1,
                            text=dict(intermediate_size=32, intermediate_size_mlp=64, hidden_size=32,
                                      max_position_embeddings=2048))


def test_run_ruler_scores_what_the_engine_generates(model_dir):
    from herd.data.longctx import generate_samples

    tok = herd.load_tokenizer(model_dir)
    model = herd.load_model(model_dir, dtype=torch.float32)
    samples = generate_samples(tok, "niah_single_1", 384, 2, seed=0, depths=[0, 100])
    recs = run_ruler(model, tok, samples, progress=False, max_new_tokens=4)
    # the same greedy continuation, computed without the eval
    direct = herd.generate(model, prompt_ids(tok, samples[0], "raw"), max_new_tokens=4,
                           stop_token_ids=sorted(set(model.config.text.eos_token_ids) | set(tok.stop_tokens)))[0]
    want = tok.decode([t for t in direct if t not in tok.stop_tokens])
    assert recs[0]["prediction"] == want
    assert recs[0]["score"] == string_match_all(want, samples[0]["answers"])
    assert recs[0]["prompt_tokens"] == 384 - 128
    ids = prompt_ids(tok, samples[0], "raw")  # one BOS, at the start (KVCache-Factory#62: no BOS mid-prompt)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    chat = prompt_ids(tok, samples[0], "chat")
    assert chat.count(tok.bos_id) == 1 and tok.decode(chat).endswith(samples[0]["answer_prefix"].lstrip())


def test_herd_eval_ruler_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "ruler"
    rc = main(["eval", "ruler", str(model_dir), "--tasks", "niah_single_1,vt", "--lengths", "400,512",
               "--samples", "2", "--depths", "0,100", "--max-new-tokens", "3", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompt_format"] == "raw" and summary["samples"] == 8
    assert set(summary["table"]) == {"niah_single_1", "vt"}
    assert set(summary["effective_length"]) >= {"absolute_85.6", "relative_90pct"}
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["length"] for r in rows} == {400, 512} and all({"prediction", "answers", "score"} <= set(r) for r in rows)
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert "niah_single_1" in (out / "table.md").read_text()
    printed = capsys.readouterr().out
    assert "s/sample" in printed and "peak RSS" in printed


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "niah_single_7"], "unknown task 'niah_single_7'"),
    (["--lengths", "200"], "too short for niah_single_1"),
    (["--lengths", "4k"], "at most 2048 positions"),
])
def test_bad_input_is_one_error_and_writes_nothing(model_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    rc = main(["eval", "ruler", str(model_dir), "--tasks", "niah_single_1", "--samples", "1",
               "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())


def test_jsonl_without_answers_is_refused(model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"task": "vt", "input": "x", "length": 300}) + "\n")
    rc = main(["eval", "ruler", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o")])
    assert rc == 2 and "sample has no 'answers'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
