"""The tiny Llama Guard recipe: data split by source item, verdict-only labels, a run through the shared loop."""

from __future__ import annotations

import json

import torch

from herd.safety import train_llama_guard as tlg
from herd.safety.llama_guard import LlamaGuard


def test_examples_are_split_by_source_item_and_cover_both_kinds():
    data = tlg.build_examples(benign_prompts=300)
    train_ids = {e["id"] for e in data["train"]}
    test_ids = {e["id"] for e in data["test"]}
    assert not train_ids & test_ids
    for split in data.values():
        kinds = {(e["kind"], e["code"] is None) for e in split}
        assert kinds == {("prompt", True), ("prompt", False), ("response", True), ("response", False)}
        for e in split:
            assert e["target"] == ("safe" if e["code"] is None else f"unsafe\n{e['code']}")
            assert e["messages"][-1]["role"] == ("user" if e["kind"] == "prompt" else "assistant")
    assert 0.15 < len(data["test"]) / (len(data["train"]) + len(data["test"])) < 0.25


def test_hand_labels_name_existing_items_and_give_s3_both_splits():
    from herd.data.safety_data import HAND_CODES, harmful_prompts

    items = {h["id"]: h for h in harmful_prompts()}
    assert all(items[i]["code"] == c for i, c in HAND_CODES.items())  # every hand-labelled id exists
    s3 = [i for i, h in items.items() if h["code"] == "S3"]
    assert sorted(s3) == sorted(i for i, c in HAND_CODES.items() if c == "S3")
    assert {tlg.split_of(i) for i in s3} == {"train", "test"}
    assert not any(h["code"] == "S14" for h in items.values())  # no bundled prompt abuses a code interpreter


def test_only_the_verdict_is_labelled(guard_tokenizer):
    tok = guard_tokenizer
    ex = {"messages": [{"role": "user", "content": "how do I hurt someone"}], "target": "unsafe\nS1"}
    ids, start = tlg.encode_example(tok, ex)
    batch = tlg.collate([(ids, start), tlg.encode_example(tok, {**ex, "target": "safe"})], pad_id=0)
    labelled = batch.labels[0][batch.labels[0] != -100].tolist()
    assert tok.decode(labelled[:-1]) == "unsafe\nS1" and labelled[-1] == tok.special_tokens["<|eot|>"]
    assert batch.input_ids[0, start - 1] == ids[start - 1]  # the assistant header's last token predicts the verdict
    assert batch.n_tokens == int((batch.labels != -100).sum())
    src = tlg.GuardBatches([(ids, start)] * 5, batch_size=2, pad_id=0, seed=1)
    next(src), next(src)
    state = src.state_dict()
    a = next(src)
    src2 = tlg.GuardBatches([(ids, start)] * 5, batch_size=2, pad_id=0, seed=1)
    src2.load_state_dict(state)
    assert torch.equal(next(src2).input_ids, a.input_ids)


def test_model_config_is_guard4_shaped():
    cfg = tlg.model_config(512, 64, 2)
    assert cfg.text.moe_layers == [] and cfg.text.attention_chunk_size is None and cfg.vision is None
    assert cfg.text.bos_token_id == 512 - 128


def test_tiny_guard_trains_through_the_shared_loop_and_loads(tmp_path, toy_guard_examples):
    toy = toy_guard_examples
    cfg = tlg.GuardTrainConfig(out=str(tmp_path / "g"), max_steps=3, batch_size=4, vocab_size=512, hidden=64,
                               layers=1, warmup=1, eval_every=3, ckpt_every=3, log_every=1, progress=False,
                               bf16=False)
    summary = tlg.train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3] and "val_loss" in rows[-1]
    ev = summary["eval"]
    assert ev["n"] == 4 and "| prompt S9 Indiscriminate Weapons |" in ev["table"]
    assert ev["per_code"]["S9"]["support"] == 2  # the two unsafe held-out prompts
    table = tlg.category_table(ev["per_code"], verdict_f1=ev["prompt"]["f1"])
    assert "| S9 Indiscriminate Weapons | 2 |" in table and "| S3 Sex-Related Crimes | 0 | no data |" in table
    guard = LlamaGuard.from_pretrained(tmp_path / "g", dtype=torch.float32)
    v = guard.scan("bomb 99")
    assert v.status in ("ok", "parse_error") and 0 <= v.score <= 1
    acc = tlg.category_accuracy(tmp_path / "g", toy[8:])  # teacher-forced code of the 2 unsafe test items
    assert acc["n"] == 2 and sum(acc["predicted"].values()) == 2 and acc["accuracy"] in (0.0, 0.5, 1.0)


def test_category_table_sets_the_guard_beside_the_bag_of_words():
    nan = float("nan")
    guard = {"S7": {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 3, "named": 6},
             "S1": {"precision": nan, "recall": 0.0, "f1": 0.0, "support": 2, "named": 0}}
    bow = {"per_code": {"S7": {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3},
                        "S1": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}}}
    table = tlg.category_table(guard, bow, verdict_f1=0.9).splitlines()
    assert table[0].startswith("| code | support | guard precision") and table[0].endswith("BoW F1 |")
    assert "| S1 Violent Crimes | 2 | – | 0.00 | 0.00 | 0.50 | 0.50 | 0.50 |" in table  # never named: no precision
    assert "| S7 Privacy | 3 | 0.50 | 1.00 | 0.67 | 1.00 | 0.67 | 0.80 |" in table
    assert len(table) == 2 + 14 + 1 and table[-1].startswith("| safe/unsafe verdict")


def test_balanced_resampling_repeats_rare_categories_only():
    ex = [{"code": "S7"}] * 16 + [{"code": "S1"}] * 4 + [{"code": "S9"}] + [{"code": None}] * 3
    out = tlg.balanced(ex, 0.5)
    count = lambda c: sum(e["code"] == c for e in out)  # noqa: E731
    assert (count("S7"), count("S1"), count("S9"), count(None)) == (16, 8, 4, 3)  # round(sqrt(16/n)) copies
    assert tlg.balanced(ex, 0.0) == ex


def test_verdict_loss_weights_the_category_token(guard_tokenizer):
    """The objective's summed loss equals plain cross-entropy over the verdict positions with the
    code token counted code_weight times (an independent computation from the full logits)."""
    from herd.model.llama4 import build_model

    tok = guard_tokenizer
    rows = [tlg.encode_example(tok, {"messages": [{"role": "user", "content": t}], "target": v})
            for t, v in [("how do I hurt someone", "unsafe\nS1"), ("hello there", "safe"),
                         ("whose address is this", "unsafe\nS7")]]
    batch = tlg.collate(rows, pad_id=0)
    model = build_model(tlg.model_config(512, 64, 1)).eval()
    fmt = tlg.format_token_ids(tok)
    loss, n, _ = tlg.VerdictLoss("cpu", fmt, code_weight=3.0)(model, batch)
    with torch.no_grad():
        logits = model(batch.input_ids)
    mask = batch.labels != -100
    ce = torch.nn.functional.cross_entropy(logits[mask].float(), batch.labels[mask], reduction="none")
    code = torch.tensor([int(t) not in fmt for t in batch.labels[mask]])
    assert int(code.sum()) == 2 and [tok.decode([int(t)]) for t in batch.labels[mask][code]] == ["1", "7"]
    assert n == int(mask.sum())
    assert torch.allclose(loss, (ce * torch.where(code, 3.0, 1.0)).sum(), rtol=1e-5)
    plain, _, _ = tlg.VerdictLoss("cpu")(model, batch)
    assert torch.allclose(plain, ce.sum(), rtol=1e-5)
