"""herd eval skills: held-out items, prompt layouts, scoring and the stop rate.

The scoring is checked by replacing the engine's replies with known ones (the right answers, a
wrong one, no stop token), so a broken verifier, parser or prompt shows up as a wrong number; the
real engine runs once per layout on a tiny random model through the CLI."""

from __future__ import annotations

import json

import pytest

from herd.evals import skills
from tests.conftest import random_model_dir


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """torch on one thread (tests.conftest.one_thread)."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return random_model_dir(tmp_path_factory.mktemp("skills_model"),
                            ["This is a handwritten digit 7. What is 12 + 5? calculator expression 0123456789\n" * 50],
                            512, vision=True, seed=1)


@pytest.fixture(scope="module")
def loaded(model_dir):
    from herd.inference.loading import load_for_inference

    return load_for_inference(str(model_dir), dtype="float32")


def test_items_are_held_out_and_have_the_asked_image_count():
    from herd.data.chat_data import split_of

    for n in (1, 5):
        items = skills.vqa_items(n, 6)
        assert len(items) == 6 and all(ex["split"] != "train" and skills._n_images(ex) == n for ex in items)
    tools = skills.tool_items(5)
    assert len(tools) == 5 and all(split_of(ex["key"]) == "test" for ex in tools)


def _fake_generate(monkeypatch, reply_of):
    """Replace the engine: each prompt's reply is reply_of(prompt ids) (token ids)."""
    monkeypatch.setattr(skills, "generate", lambda model, tok, prompts, max_new: [reply_of(ids) for ids, _ in prompts])


def test_chat_scoring_right_answers_score_one_and_stop(loaded, monkeypatch):
    from herd.chat import encode_messages

    model, tok = loaded
    items = [ex for n in (1, 5) for ex in skills.vqa_items(n, 3)]
    tools = skills.tool_items(3)
    eot, eom = tok.special_tokens["<|eot|>"], tok.special_tokens["<|eom|>"]
    seen = []

    def fake(model, tok_, prompts, max_new):  # the engine, answering in prompt order
        seen.append(prompts)
        if prompts[0][1] is not None:  # the VQA batch
            return [tok.encode(ex["answer"]) + [eot] for ex in items]
        return [tok.encode(json.dumps({"name": "calculator", "parameters": {"expression": json.loads(
            ex["messages"][2]["tool_calls"][0]["function"]["arguments"])["expression"].replace(" ", "")}})) + [eom]
            for ex in tools]

    monkeypatch.setattr(skills, "generate", fake)
    s = skills.aggregate(skills.run_skills(model, tok, "chat", 3, 3), "chat")
    assert (s["digit_vqa_1"], s["digit_vqa_5"], s["tool_use"], s["tool_call_rate"], s["stop_rate"]) == (1, 1, 1, 1, 1)
    assert s["n"] == {"digit_vqa_1": 3, "digit_vqa_5": 3, "tool_use": 3, "stop_rate": 9}
    # the prompts are the chat format of the item without its last reply
    ids, px = encode_messages(tok, items[3]["messages"][:-1], vision_config=model.config.vision)
    assert seen[0][3][0] == ids and seen[0][3][1].shape[0] == 5
    assert seen[1][0][0] == encode_messages(tok, tools[0]["messages"][:2])[0]

    wrong_call = {"name": "calculator", "parameters": {"expression": "1 + 1"}}
    _fake_generate(monkeypatch, lambda ids: tok.encode("x y") if ids.count(tok.special_tokens["<|image|>"])
                   else tok.encode(json.dumps(wrong_call)))
    s = skills.aggregate(skills.run_skills(model, tok, "chat", 3, 3), "chat")
    assert (s["digit_vqa_1"], s["digit_vqa_5"], s["tool_use"], s["tool_call_rate"], s["stop_rate"]) == (0, 0, 0, 1, 0)


def test_raw_layout_reads_each_image_after_the_earlier_captions(loaded, monkeypatch):
    from herd.data.multimodal import PROMPT_TEXT

    model, tok = loaded
    seen = []
    prompt_tail = tok.encode(PROMPT_TEXT)

    def seven(ids):
        seen.append(ids)
        return tok.encode("7.")

    _fake_generate(monkeypatch, seven)
    records = skills.run_skills(model, tok, "raw", 2, 2)
    five = [r for r in records if r["task"] == "digit_vqa_5"]
    assert all(r["digits_read"] == [7] * 5 for r in five)
    assert all(r["reply"] in ("7 7 7 7 7", "35", "7") and r["score"] == float(r["reply"] == r["answer"]) for r in five)
    reads = [ids for ids in seen if ids[-len(prompt_tail):] == prompt_tail]
    bos, image = tok.special_tokens["<|begin_of_text|>"], tok.special_tokens["<|image|>"]
    assert sorted(ids.count(bos) for ids in reads) == [1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert all(ids.count(bos) == ids.count(image) for ids in reads)
    caption = tok.encode("This is a handwritten digit 7.") + [tok.special_tokens["<|end_of_text|>"]]
    longest = max(reads, key=len)
    assert sum(longest[i:i + len(caption)] == caption for i in range(len(longest))) == 4  # own answers, in context
    assert skills.aggregate(records, "raw")["n"]["stop_rate"] == 2  # the tool-use replies only


def test_digits_answer_follows_the_generator():
    assert skills._digits_answer("What is the sum of these digits?", [1, 2, 3]) == "6"
    assert skills._digits_answer("Which is the largest digit here?", [1, 9, 3]) == "9"
    assert skills._digits_answer("Which digits are these, in order?", [1, 9, 3]) == "1 9 3"


def test_calls_match_the_expression_ignoring_spaces():
    call = lambda name, args: {"function": {"name": name, "arguments": json.dumps(args)}}  # noqa: E731
    assert skills._calls(call("calculator", {"expression": "12+5"}), "12 + 5")
    assert not skills._calls(call("calculator", {"expression": "12-5"}), "12 + 5")
    assert not skills._calls(call("search", {"expression": "12 + 5"}), "12 + 5")
    assert not skills._calls({"function": {"name": "calculator", "arguments": "{bad"}}, "12 + 5")


@pytest.mark.parametrize("fmt", ["chat", "raw"])
def test_cli_writes_records_and_summary(model_dir, tmp_path, fmt):
    from herd.cli import main

    out = tmp_path / fmt
    assert main(["eval", "skills", str(model_dir), "--format", fmt, "--limit", "1", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["prompt_format"] == fmt and s["n"]["digit_vqa_1"] == s["n"]["digit_vqa_5"] == s["n"]["tool_use"] == 1
    assert len((out / "records.jsonl").read_text().splitlines()) == 3


def test_cli_refuses_an_unknown_format(model_dir, tmp_path, capsys):
    from herd.cli import main

    assert main(["eval", "skills", str(model_dir), "--format", "json", "--out", str(tmp_path)]) == 2
    assert "--format must be raw or chat" in capsys.readouterr().err


def test_tool_prompt_is_what_sft_trained_on_and_the_trained_call_scores_one(loaded, monkeypatch):
    """The chat tool-use prompt is a prefix of the SFT dialog as herd sft encodes it (herd.train.chat_rows),
    and the dialog's own next tokens (the reference call, up to its <|eom|>) score 1 and count as stopped."""
    from herd.chat import encode_messages
    from herd.train.chat_rows import encode_dialog

    _, tok = loaded
    tools = skills.tool_items(3)
    replies = []
    for ex in tools:
        ids, mask, _ = encode_dialog(tok, ex["messages"])
        prompt = encode_messages(tok, ex["messages"][:2])[0]
        assert ids[:len(prompt)] == prompt and mask[len(prompt)]  # the reply is the first trained token on
        rest = ids[len(prompt):]
        replies.append(rest[: rest.index(tok.special_tokens["<|eom|>"]) + 1])
    model = loaded[0]
    monkeypatch.setattr(model.config, "vision", None)  # the tool-use rows only
    monkeypatch.setattr(skills, "generate", lambda model, tok_, prompts, max_new: replies)
    s = skills.aggregate(skills.run_skills(model, tok, "chat", 3, 3), "chat")
    assert (s["tool_use"], s["tool_call_rate"], s["stop_rate"], s["n"]["tool_use"]) == (1, 1, 1, 3)
