"""SFT: the loss mask (assistant tokens + end-of-turn, by role), packing without cross-talk at
per-example positions, multi-image turns, bad input, pruning, resume, and the chat data builder."""

from __future__ import annotations

import base64
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import herd
from herd.chat import encode_messages
from herd.train.chat_rows import BadLines, Example, check_sft_row, encode_dialog, load_examples, pack_rows
from herd.train.sft import MaskedNextTokenLoss, SFTConfig, sft


def _png(seed: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


DIALOGS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, how are you?"},
     {"role": "assistant", "content": "I am fine, thank you."}, {"role": "user", "content": "The sum of 3 and 4?"},
     {"role": "assistant", "content": "It is 7."}],
    [{"role": "user", "content": "What is 3 + 4?"},
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
         "name": "calculator", "arguments": "{\"expression\": \"3 + 4\"}"}}]},
     {"role": "tool", "content": "7"}, {"role": "assistant", "content": "3 + 4 = 7"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png(1)}},
                                  {"type": "image_url", "image_url": {"url": _png(2)}},
                                  {"type": "image_url", "image_url": {"url": _png(3)}},
                                  {"type": "text", "text": "Which digits are these?"}]},
     {"role": "assistant", "content": "1 2 3"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png(4)}},
                                  {"type": "text", "text": "Which digit is this?"}]},
     {"role": "assistant", "content": "It is a seven."}],
]


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _role_mask(tok, messages, vision) -> list[bool]:
    """Independent reference: token t is a loss token iff it lies in an assistant message's
    span after its header (found by encoding dialog prefixes with herd.chat)."""
    from herd.chat import header_tokens

    full, _ = encode_messages(tok, messages, add_generation_prompt=False, vision_config=vision)
    mask = [False] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(encode_messages(tok, messages[:i], add_generation_prompt=False, vision_config=vision)[0])
        end = len(encode_messages(tok, messages[:i + 1], add_generation_prompt=False, vision_config=vision)[0])
        for t in range(start + len(header_tokens(tok, "assistant")), end):
            mask[t] = True
    return mask


def test_mask_is_the_assistant_replies_with_their_end_of_turn(chat_model):
    model_dir, tok = chat_model
    vision = herd.load_model(model_dir).config.vision
    for messages in DIALOGS:
        ids, mask, tiles = encode_dialog(tok, messages, vision)
        full, full_tiles = encode_messages(tok, messages, add_generation_prompt=False, vision_config=vision)
        assert ids == full and len(tiles) == len(full_tiles)
        assert mask == _role_mask(tok, messages, vision)
        # every assistant turn's last loss token is its end-of-turn (or end-of-message for a tool call)
        ends = {tok.special_tokens["<|eot|>"], tok.special_tokens["<|eom|>"]}
        runs = [i for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
        assert len(runs) == sum(m["role"] == "assistant" for m in messages)
        assert all(ids[i] in ends for i in runs)
    text = tok.decode([i for i, m in zip(*encode_dialog(tok, DIALOGS[0])[:2]) if m])
    assert text == "I am fine, thank you.<|eot|>It is 7.<|eot|>"


def test_packed_loss_matches_float64_reference_that_masks_by_role(chat_model, tmp_path):
    """One packed row of four dialogs (text, tool use, 3 images, 1 image) = the sum of each
    dialog's masked loss computed alone in float64: no attention across examples, positions
    restart (the test model's chunk is 16 tokens, so absolute positions would change the result),
    images in order."""
    model_dir, tok = chat_model
    model = herd.load_model(model_dir)
    vision = model.config.vision
    path = _write(tmp_path / "d.jsonl", [{"messages": m} for m in DIALOGS])
    examples = load_examples(path, tok, vision, 1024, BadLines(False))
    batch = pack_rows(examples, 1024, pad_id=0)
    assert batch.input_ids.shape[0] == 1 and int(batch.document_ids.max()) == 4
    loss, n, _ = MaskedNextTokenLoss(torch.device("cpu"))(model, batch)

    ref_model = copy.deepcopy(model).double()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for messages in DIALOGS:
        ids, tiles = encode_messages(tok, messages, add_generation_prompt=False, vision_config=vision)
        mask = _role_mask(tok, messages, vision)
        x = torch.tensor([ids])
        px = torch.cat(tiles).double() if tiles else None
        logits = ref_model(x, pixel_values=px)[0]  # [T, V] float64
        target = torch.tensor(ids[1:] + [0])
        keep = torch.tensor(mask[1:] + [False])
        total += F.cross_entropy(logits[keep], target[keep], reduction="sum")
        count += int(keep.sum())
    assert n == count
    loss = float(loss.detach())
    assert abs(loss - float(total)) < 1e-5 * float(total), (loss, float(total))


def test_packed_examples_do_not_see_each_other(chat_model):
    model_dir, tok = chat_model
    model = herd.load_model(model_dir)
    a_ids, a_mask, _ = encode_dialog(tok, DIALOGS[0])
    b_ids, b_mask, _ = encode_dialog(tok, DIALOGS[1])
    other = [a_ids[0]] + [(t + 7) % 400 for t in a_ids[1:]]  # the first example, different tokens
    rows = [pack_rows([Example("a", x, a_mask, []), Example("b", b_ids, b_mask, [])], 256, 0) for x in (a_ids, other)]
    with torch.no_grad():
        out = [model(r.input_ids, position_ids=r.position_ids, document_ids=r.document_ids) for r in rows]
    n = len(a_ids)
    assert not torch.allclose(out[0][0, :n], out[1][0, :n])
    assert torch.equal(out[0][0, n:n + len(b_ids)], out[1][0, n:n + len(b_ids)])


@pytest.mark.parametrize("line, problem", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
    ({"conversation": []}, "missing field 'messages'"),
    ({"messages": [{"role": "user"}]}, "has no 'content'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "nope.png"}]},
                   {"role": "assistant", "content": "x"}]}, "image 'nope.png' does not exist"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                   {"role": "assistant", "content": "x"}]}, "not an image"),
    ({"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "x"}]}, "longer than"),
    ("{not json", "not JSON"),
])
def test_bad_lines_name_file_line_and_problem(chat_model, tmp_path, line, problem):
    model_dir, tok = chat_model
    vision = herd.load_model(model_dir).config.vision
    path = _write(tmp_path / "bad.jsonl", [{"messages": DIALOGS[0]}, line])
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{problem}"):
        load_examples(path, tok, vision, 256, BadLines(False))
    bad = BadLines(True)
    assert len(load_examples(path, tok, vision, 256, bad)) == 1 and len(bad.messages) == 1
    assert "skipped 1 bad line" in bad.summary()


def _cfg(tmp_path, model_dir, data, **kw):
    base = dict(init=str(model_dir), data=str(data), out=str(tmp_path), max_steps=4, batch_size=2, seq_len=256,
                warmup=1, log_every=1, eval_every=2, ckpt_every=2, prune=0.0, progress=False, bf16=False, lr=3e-3)
    return SFTConfig(**{**base, **kw})


def _sft_data(tmp_path) -> Path:
    rows = [{"id": f"ex{i}", "task": "chat", "messages": DIALOGS[i % len(DIALOGS)]} for i in range(12)]
    _write(tmp_path / "val.jsonl", rows[:4])
    return _write(tmp_path / "train.jsonl", rows)


def test_sft_run_resumes_bit_exact_and_loads(chat_model, tmp_path):
    model_dir, _ = chat_model
    data = _sft_data(tmp_path)
    full = sft(_cfg(tmp_path / "full", model_dir, data))
    sft(_cfg(tmp_path / "part", model_dir, data, stop_after=2))
    sft(_cfg(tmp_path / "part", model_dir, data, resume=True))
    rows = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = rows("full"), rows("part")
    assert [r["step"] for r in a] == [1, 2, 3, 4] and [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r.get("val_loss") for r in a] == [r.get("val_loss") for r in b] and "val_loss" in a[-1]
    assert a[-1]["loss"] < a[0]["loss"]
    assert full["val_loss"] == a[-1]["val_loss"] and (tmp_path / "full" / "loss.png").exists()
    m1, m2 = herd.load_model(tmp_path / "full"), herd.load_model(tmp_path / "part")
    assert all(torch.equal(x, y) for x, y in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_pruning_drops_the_easiest_by_the_score_it_reports(chat_model, tmp_path):
    from herd.train.prune import choose

    scores = [{"id": f"v{i}", "task": "t", "pass_rate": p, "loss": l}
              for i, (p, l) in enumerate([(1.0, 0.1), (1.0, 0.5), (0.5, 0.2), (0.0, 0.3)])]
    scores += [{"id": f"u{i}", "task": "u", "pass_rate": None, "loss": l} for i, l in enumerate([3.0, 1.0, 2.0, 4.0])]
    keep = choose(scores, 0.5)
    assert [s["id"] for s, k in zip(scores, keep) if k] == ["v2", "v3", "u0", "u3"]
    random_keep = choose(scores, 0.5, "random", seed=1)
    assert sum(random_keep) == 4

    model_dir, _ = chat_model
    rows = [{"id": f"q{i}", "task": "exact", "messages": [{"role": "user", "content": f"Say {i}"},
                                                           {"role": "assistant", "content": str(i)}],
             "answer": str(i), "verifier": "exact"} for i in range(6)]
    rows += [{"id": f"c{i}", "task": "chat", "messages": DIALOGS[i % 2]} for i in range(4)]
    data = _write(tmp_path / "train.jsonl", rows)
    summary = sft(_cfg(tmp_path / "run", model_dir, data, prune=0.5, prune_k=2, prune_max_new=4, max_steps=1))
    assert summary["kept"] == 5 and summary["pruned"] == 5
    report = [json.loads(x) for x in (tmp_path / "run" / "prune" / "scores.jsonl").read_text().splitlines()]
    for task in ("exact", "chat"):
        mine = [r for r in report if r["task"] == task]
        key = lambda r: (-(r["pass_rate"] if r["pass_rate"] is not None else -1), r["loss"])  # noqa: E731
        ranked = sorted(mine, key=key)  # easiest first, by the scores the run wrote
        n_drop = round(len(mine) * 0.5)
        assert [r["kept"] for r in ranked] == [False] * n_drop + [True] * (len(mine) - n_drop)
    assert all(r["pass_rate"] is not None for r in report if r["task"] == "exact")
    kept = (tmp_path / "run" / "prune" / "kept.txt").read_text().split()
    assert len(kept) == 5 and (tmp_path / "run" / "prune" / "difficulty.png").stat().st_size > 5000


def test_difficulty_plot_of_a_task_mixing_verifiable_and_free_items(tmp_path):
    """code_qa has verifiable items (pass rate) and free ones (None): the histogram shows the pass rates."""
    from herd.train.prune import plot_difficulty

    scores = [{"id": f"m{i}", "task": "mixed", "pass_rate": p, "loss": 1.0 + i}
              for i, p in enumerate([1.0, 0.5, None, 0.0, None])]
    scores += [{"id": "f0", "task": "free", "pass_rate": None, "loss": 2.0}]
    plot_difficulty(scores, [True, False, True, True, False, True], tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 5000


def test_cli_bad_data_is_one_line_exit_2(chat_model, tmp_path, capsys):
    from herd.cli import main

    model_dir, _ = chat_model
    data = _write(tmp_path / "x.jsonl", [{"messages": [{"role": "robot", "content": "hi"}]}])
    assert main(["sft", "--init", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.jsonl:1" in err[0] and "unknown role" in err[0]


def test_chat_data_builds_splits_and_its_references_verify(tmp_path):
    from herd.data.chat_data import build, verify

    summary = build(tmp_path, per_task=30, tasks=("chain_sum", "digits_vqa", "calculator"), progress=False)
    assert set(summary["tasks"]) == {"chain_sum", "digits_vqa", "calculator"}
    rows = {s: [json.loads(x) for x in (tmp_path / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "val", "test")}
    assert rows["train"] and rows["val"] + rows["test"]
    train_q = {json.dumps(r["messages"][:-1]) for r in rows["train"]}
    assert not any(json.dumps(r["messages"][:-1]) in train_q for r in rows["val"] + rows["test"])
    for r in rows["train"]:
        check_sft_row(r)
        ref = r["messages"][-1]["content"]
        assert verify(r, ref) == 1.0, r
        assert verify(r, "no idea") == 0.0
    vqa = [r for r in rows["train"] if r["task"] == "digits_vqa"]
    n_images = {sum(p.get("type") == "image_url" for p in r["messages"][0]["content"]) for r in vqa}
    assert n_images <= set(range(1, 6)) and len(n_images) > 2
    calc = next(r for r in rows["train"] if r["task"] == "calculator")
    assert [m["role"] for m in calc["messages"]] == ["system", "user", "assistant", "tool", "assistant"]


def test_long_context_dialogs_come_from_the_longctx_generators(chat_model, tmp_path):
    from herd.data.chat_data import build, verify

    _, tok = chat_model
    summary = build(tmp_path, per_task=40, tasks=("longctx",), tokenizer=tok, longctx_length=600, progress=False)
    rows = [json.loads(x) for s in ("train", "val", "test") for x in (tmp_path / f"{s}.jsonl").read_text().splitlines()]
    assert sum(summary["tasks"]["longctx"].values()) == len(rows) == 4
    for r in rows:
        check_sft_row(r)
        assert verify(r, r["messages"][-1]["content"]) == 1.0 and verify(r, "nothing") == 0.0
