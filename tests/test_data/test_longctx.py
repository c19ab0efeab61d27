"""Synthetic long-context tasks (herd/data/longctx.py): exact token lengths and depths for the
official Llama 4 tokenizer and a trained one, determinism by file hash, needles once, answers
that follow from the text, and clear errors."""

from __future__ import annotations

import hashlib
import re
from collections import Counter

import pytest

from herd.cli import main
from herd.data.longctx import (TASKS, NEEDLE_TASKS, make_sample, generate_samples, parse_lengths, parse_tasks,
                               read_samples, write_jsonl_atomic)


@pytest.fixture(scope="module")
def llama4():
    from herd.tokenizer import load_tokenizer

    return load_tokenizer("llama4")


def base_tokens(tok, s) -> int:
    """Tokens the base layout feeds the model plus the generation budget: BOS + input + prefix + gen."""
    return 1 + len(tok.encode(s["input"] + s["answer_prefix"])) + s["tokens_to_generate"]


@pytest.mark.parametrize("which", ["llama4", "trained"])
@pytest.mark.parametrize("task", list(TASKS))
def test_lengths_are_exact_in_tokens(task, which, llama4, tok):
    t = llama4 if which == "llama4" else tok
    for length, seed in [(1024, 0), (2048, 1), (1500, 2)]:
        s = make_sample(t, task, length, seed=seed, depth=40.0)
        assert base_tokens(t, s) == length
        assert s["length"] == length and s["task"] == task and s["seed"] == seed
        assert "<|begin_of_text|>" not in s["input"]  # the needle text never carries a BOS


@pytest.mark.parametrize("which", ["llama4", "trained"])
def test_needle_depths_follow_the_request(which, llama4, tok):
    t = llama4 if which == "llama4" else tok
    for task in ("niah_single_1", "niah_single_2", "niah_multikey_2"):
        for depth in (0.0, 25.0, 50.0, 75.0, 100.0):
            s = make_sample(t, task, 4096, seed=3, depth=depth)
            assert s["depth"] == depth
            # measured in tokens of the context; needles sit at sentence starts, ≤ ~one sentence away
            assert abs(s["actual_depth"] - depth) <= 4.0, (task, depth, s["actual_depth"])


@pytest.mark.parametrize("task", NEEDLE_TASKS + ("multihop",))
def test_each_needle_value_occurs_exactly_once(task, llama4):
    for seed in range(4):
        s = make_sample(llama4, task, 2048, seed=seed, depth=(seed * 33) % 101)
        for v in s["answers"]:
            assert s["input"].count(v) == 1, (task, seed, v)
        needle_type = {"niah_single_3": "uuids", "niah_multikey_3": "uuids"}.get(task, "numbers")
        if task != "multihop":
            n_needles = len(re.findall(rf"One of the special magic {needle_type} for ", s["input"]))
            want = TASKS[task].num_keys * TASKS[task].num_values
            assert n_needles >= want and (TASKS[task].haystack == "needles" or n_needles == want)


def test_values_have_rulers_formats(llama4):
    s = make_sample(llama4, "niah_single_1", 1024, seed=5)
    assert re.fullmatch(r"\d{7}", s["answers"][0])
    assert s["input"].count("The grass is green.") > 5
    u = make_sample(llama4, "niah_multikey_3", 1024, seed=5)["answers"][0]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", u)
    s = make_sample(llama4, "niah_multivalue", 1024, seed=5)
    assert len(s["answers"]) == 4 and s["answer_prefix"].startswith(" The special magic numbers for ")


def test_answers_follow_from_the_text(llama4, tok):
    # variable tracking: the answers are exactly the variables the chain assigns the value to
    s = make_sample(llama4, "vt", 2048, seed=7)
    value = re.search(r"assigned the value (\d+)", s["input"]).group(1)
    env = {}
    for name, rhs in re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", s["input"]):
        env[name] = env.get(rhs[4:]) if rhs.startswith("VAR ") else rhs
    assert sorted(k for k, v in env.items() if v == value) == sorted(s["answers"])
    # common words: the 10 answers are the 10 most frequent entries, each above every other word
    s = make_sample(tok, "cwe", 2048, seed=7)
    counts = Counter(re.findall(r"\d+\. (\w+)", s["input"]))
    top = counts.most_common()
    assert {w for w, _ in top[:10]} == set(s["answers"]) and top[9][1] > top[10][1]
    # frequent words: the three answers are the three most frequent coded words
    s = make_sample(llama4, "fwe", 2048, seed=7)
    ctx = s["input"].split("coded words. ", 1)[1].rsplit("\nQuestion:", 1)[0]
    counts = Counter(w for w in ctx.split() if w != "....")
    assert [c for _, c in counts.most_common(3)] == [counts[a] for a in s["answers"]]
    # file_defines: the answer's file has the definition, exactly once in the whole context
    s = make_sample(llama4, "file_defines", 2048, seed=7)
    path, qual = s["answers"]
    name = qual.rsplit(".", 1)[-1]
    assert len(re.findall(rf"(?m)^\s*(?:async\s+)?(?:def|class)\s+{name}\b", s["input"])) == 1
    section = s["input"].split(f"### file: {path}\n", 1)[1].split("### file:", 1)[0]
    assert re.search(rf"(?m)^\s*(?:async\s+)?(?:def|class)\s+{name}\b", section)
    # multi-hop: following the chain from the asked key reaches the answer
    s = make_sample(llama4, "multihop", 2048, seed=7)
    key = re.search(r"What is the code for the ([\w-]+)\?", s["input"]).group(1)
    for _ in range(10):
        m = re.search(rf"The code for the {key} is the same as the code for the ([\w-]+)\.", s["input"])
        if not m:
            break
        key = m.group(1)
    assert re.search(rf"The code for the {key} is (\d+)\.", s["input"]).group(1) == s["answers"][0]


def test_same_seed_same_file_hash(llama4, tmp_path):
    def digest(seed, name):
        rows = []
        for task in ("niah_single_2", "niah_multiquery", "vt", "cwe", "fwe", "file_defines"):
            rows += generate_samples(llama4, task, 1024, 2, seed=seed, depths=[10, 90])
        return hashlib.sha256(write_jsonl_atomic(rows, tmp_path / name).read_bytes()).hexdigest()

    assert digest(0, "a.jsonl") == digest(0, "b.jsonl")
    assert digest(0, "a.jsonl") != digest(1, "c.jsonl")


def test_bad_input_is_one_clear_error(llama4, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'niah_single_9'"):
        parse_tasks("niah_single_1,niah_single_9")
    with pytest.raises(ValueError, match="too short for niah_single_2"):
        make_sample(llama4, "niah_single_2", 160)
    with pytest.raises(ValueError, match="generates 128 tokens"):
        make_sample(llama4, "niah_single_1", 100)
    with pytest.raises(ValueError, match="bad length"):
        parse_lengths("4q")
    assert parse_lengths("1k,4k,300") == [1024, 4096, 300]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "vt", "input": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: sample has no 'answers'"):
        read_samples(bad)


def test_cli_writes_jsonl_and_refuses_unknown_tasks(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    rc = main(["data", "longctx", "--tokenizer", "llama4", "--tasks", "niah_single_1,vt", "--lengths", "512,1k",
               "--samples", "2", "--depths", "0,100", "--out", str(out)])
    assert rc == 0
    rows = read_samples(out)
    assert [(r["task"], r["length"]) for r in rows][::2] == [("niah_single_1", 512), ("niah_single_1", 1024),
                                                             ("vt", 512), ("vt", 1024)]
    bad = tmp_path / "x" / "r.jsonl"
    rc = main(["data", "longctx", "--tasks", "nope", "--out", str(bad)])
    assert rc == 2 and "unknown task 'nope'" in capsys.readouterr().err
    assert not bad.exists()
