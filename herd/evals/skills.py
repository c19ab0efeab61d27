"""Chat skills of one model, through herd's engine: digit VQA with 1 and with 5 images, tool use, stop rate.

    herd eval skills runs/speedrun/sft --format chat --out runs/speedrun/sft/skills
    herd eval skills runs/speedrun/base --format raw --out runs/speedrun/base/skills

The held-out items come from the same generators as the SFT data (herd/data/chat_data.py), so the
tasks are the ones SFT taught, on items it never saw:

    digit VQA    digits_vqa_examples: 1–5 bundled handwritten digits in one user turn ("Which digit
                 is this?", "Which digits are these, in order?", their sum, the largest). Only items
                 off the train split, whose images are the pre-training *validation* digits; scored
                 with the generator's verifier (exact match). Two rows: items with exactly 1 image
                 and items with exactly 5.
    tool use     calculator_examples, test split: system prompt describing `calculator`, user asks
                 "What is 37 * 4?"; right when the reply is a call to calculator (parsed as
                 llama-models does, herd.chat.decode_assistant) whose expression is the asked one.
    stop rate    the share of generated replies that end with a stop token (<|eot|>, or <|eom|> after
                 a tool call, or <|end_of_text|>) within the token budget, rather than running on.

Two prompt layouts (the summary records which; the speedrun passes raw for BASE and MID, chat
for SFT, RL and DPO):

    chat   the Llama 4 chat format (herd.chat.encode_messages), the item's messages without the
           last assistant reply, then the assistant header; greedy decoding.
    raw    what a pre-trained model knows, the pre-training digit-document layout
           (herd/data/multimodal.py): `<|begin_of_text|> <image> This is a handwritten digit ` → the
           model names the digit. A k-image item is read image by image in one packed sequence,
           each earlier image followed by the caption with the model's own answer and
           <|end_of_text|>, as packed pre-training documents are; the question (which, sum,
           largest) is then answered from the digits read, so the raw rows measure perception
           only. Images are tiled from the item's PNGs as the chat format tiles them (the same
           pixels in both layouts). Tool use: `<|begin_of_text|>SYSTEM\\n\\nUSER\\n\\n` and the
           same call parser.
           Stop rate counts the tool-use replies (the digit reads are 2 tokens by design).

Each sample gives one record (idx, task, n_images, reply, answer, score, stopped), written to
OUT/records.jsonl; `aggregate(records)` turns them into OUT/summary.json:

    {"prompt_format": "chat", "digit_vqa_1": 0.4, "digit_vqa_5": 0.05, "tool_use": 0.9,
     "tool_call_rate": 1.0, "stop_rate": 0.97, "n": {"digit_vqa_1": 40, ...}}

tool_call_rate is the share of tool-use replies that call `calculator` at all (right or wrong
expression): it separates "learned the call format" from "copied the numbers".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

FORMATS = ("raw", "chat")


# ----------------------------------------------------------------------------- held-out items
def vqa_items(n_images: int, limit: int, seed: int = 0) -> list[dict]:
    """Held-out digit-VQA items with exactly `n_images` images (off the SFT train split)."""
    from herd.data.chat_data import digits_vqa_examples

    pool = digits_vqa_examples(max(200, 60 * limit), seed=seed)
    items = [ex for ex in pool if ex["split"] != "train" and _n_images(ex) == n_images]
    return items[:limit]


def tool_items(limit: int, seed: int = 0) -> list[dict]:
    """Held-out calculator tool-use items (test split of the SFT data's split rule)."""
    from herd.data.chat_data import calculator_examples, split_of

    return [ex for ex in calculator_examples(max(100, 30 * limit), seed=seed) if split_of(ex["key"]) == "test"][:limit]


def _n_images(ex: dict) -> int:
    return sum(1 for p in ex["messages"][0]["content"] if isinstance(p, dict) and p.get("type") == "image_url")


def _digits_answer(question: str, digits: list[int]) -> str:
    """The answer the generator would give for `question` about `digits` (raw layout)."""
    if question.startswith("What is the sum"):
        return str(sum(digits))
    if question.startswith("Which is the largest"):
        return str(max(digits))
    return " ".join(map(str, digits))


# ----------------------------------------------------------------------------- generation
@torch.no_grad()
def generate(model, tokenizer, prompts: list[tuple[list[int], torch.Tensor | None]], max_new: int) -> list[list[int]]:
    """Greedy replies (token ids, the stop token included when one was sampled) through herd.Engine."""
    from herd.inference.engine import Engine
    from herd.inference.sampling import SamplingParams

    engine = Engine(model, max_batch=16, tokenizer=tokenizer)
    out: list[list[int]] = [[] for _ in prompts]
    for i, (ids, px) in enumerate(prompts):
        engine.add(ids, SamplingParams(max_new_tokens=max_new, temperature=0.0), pixel_values=px, seq_id=i)
    for ev in engine.run():
        if ev.token is not None:
            out[ev.seq_id].append(ev.token)
    return out


def _images(ex: dict, vision) -> list:
    """The item's images as herd.image.TiledImage (tiles [n, 3, S, S] and grid), as the chat format tiles them."""
    from herd.chat import _image_source
    from herd.image import VisionSettings, preprocess_image

    settings = VisionSettings.from_config(vision)
    return [preprocess_image(_image_source(p), settings) for p in ex["messages"][0]["content"]
            if isinstance(p, dict) and p.get("type") == "image_url"]


def _raw_digit_reads(model, tok, items: list[dict]) -> list[list[int | None]]:
    """Each item's images named one by one in the pre-training caption layout (see the docstring)."""
    from herd.chat import image_tokens
    from herd.data.multimodal import CAPTION_TEMPLATE, PROMPT_TEXT
    from herd.image import VisionSettings

    settings = VisionSettings.from_config(model.config.vision)
    bos, eos = tok.special_tokens["<|begin_of_text|>"], tok.special_tokens["<|end_of_text|>"]
    images = [_images(ex, model.config.vision) for ex in items]
    reads: list[list[int | None]] = [[] for _ in items]
    for k in range(max((len(t) for t in images), default=0)):  # round k: every item's k-th image
        todo = [i for i, t in enumerate(images) if k < len(t)]
        prompts = []
        for i in todo:
            ids: list[int] = []
            for j in range(k + 1):
                ids += [bos] + image_tokens(tok, images[i][j].grid, settings.tokens_per_tile)
                if j < k:
                    d = reads[i][j]
                    ids += tok.encode(CAPTION_TEMPLATE.format(digit="?" if d is None else d)) + [eos]
            ids += tok.encode(PROMPT_TEXT)
            prompts.append((ids, torch.cat([im.tiles for im in images[i][: k + 1]])))
        for i, reply in zip(todo, generate(model, tok, prompts, max_new=2)):
            m = re.match(r"\s*(\d)", tok.decode([t for t in reply if t not in tok.stop_tokens]))
            reads[i].append(int(m.group(1)) if m else None)
    return reads


# ----------------------------------------------------------------------------- the evaluation
def run_skills(model, tok, prompt_format: str = "chat", vqa_limit: int = 40, tool_limit: int = 40,
               seed: int = 0) -> list[dict]:
    """One record per sample: {idx, task, n_images, reply, answer, score, stopped}."""
    from herd.chat import decode_assistant, encode_messages
    from herd.data.chat_data import verify

    if prompt_format not in FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; choose raw or chat")
    vqa = [("digit_vqa_1", ex) for ex in vqa_items(1, vqa_limit, seed)] + \
          [("digit_vqa_5", ex) for ex in vqa_items(5, vqa_limit, seed)]
    tools = tool_items(tool_limit, seed)
    records = []
    if model.config.vision is None:
        vqa = []  # a text-only model has no VQA rows (its summary says n = 0)
    if prompt_format == "chat" and vqa:
        prompts = []
        for _, ex in vqa:
            ids, tiles = encode_messages(tok, ex["messages"][:-1], vision_config=model.config.vision)
            prompts.append((ids, torch.cat(tiles)))
        for (task, ex), ids in zip(vqa, generate(model, tok, prompts, max_new=24)):
            msg = decode_assistant(tok, ids)
            records.append({"task": task, "id": ex["id"], "n_images": _n_images(ex), "reply": msg["content"],
                            "answer": ex["answer"], "score": verify(ex, msg["content"]),
                            "stopped": msg["stop_reason"] != "length"})
    elif vqa:
        for (task, ex), digits in zip(vqa, _raw_digit_reads(model, tok, [ex for _, ex in vqa])):
            question = ex["messages"][0]["content"][-1]["text"]
            reply = "" if None in digits else _digits_answer(question, digits)
            records.append({"task": task, "id": ex["id"], "n_images": _n_images(ex), "reply": reply,
                            "digits_read": digits, "answer": ex["answer"], "score": verify(ex, reply),
                            "stopped": None})
    if prompt_format == "chat":
        prompts = [(encode_messages(tok, ex["messages"][:2])[0], None) for ex in tools]
    else:
        prompts = [(tok.encode(ex["messages"][0]["content"] + "\n\n" + ex["messages"][1]["content"] + "\n\n",
                               bos=True), None) for ex in tools]
    for ex, ids in zip(tools, generate(model, tok, prompts, max_new=64)):
        msg = decode_assistant(tok, ids)
        expected = json.loads(ex["messages"][2]["tool_calls"][0]["function"]["arguments"])["expression"]
        records.append({"task": "tool_use", "id": ex["id"], "n_images": 0,
                        "reply": msg["content"] or json.dumps([c["function"] for c in msg["tool_calls"]]),
                        "answer": expected, "score": float(any(_calls(c, expected) for c in msg["tool_calls"])),
                        "called": any(c["function"]["name"] == "calculator" for c in msg["tool_calls"]),
                        "stopped": msg["stop_reason"] != "length"})
    for i, r in enumerate(records):
        r["idx"] = i
    return records


def _calls(call: dict, expression: str) -> bool:
    """A calculator call whose expression is `expression` (spacing ignored)."""
    try:
        args = json.loads(call["function"]["arguments"])
    except (TypeError, ValueError):
        return False
    expr = args.get("expression") if isinstance(args, dict) else None
    return call["function"]["name"] == "calculator" and isinstance(expr, str) and \
        expr.replace(" ", "") == expression.replace(" ", "")


def aggregate(records: list[dict], prompt_format: str) -> dict:
    """Mean score per task and the stop rate over replies that could stop (None where there are none)."""
    summary: dict = {"prompt_format": prompt_format, "n": {}}
    for task in ("digit_vqa_1", "digit_vqa_5", "tool_use"):
        scores = [r["score"] for r in records if r["task"] == task]
        summary[task] = sum(scores) / len(scores) if scores else None
        summary["n"][task] = len(scores)
    called = [r["called"] for r in records if r["task"] == "tool_use"]
    summary["tool_call_rate"] = sum(called) / len(called) if called else None  # well-formed calculator calls
    stops = [r["stopped"] for r in records if r["stopped"] is not None]
    summary["stop_rate"] = sum(stops) / len(stops) if stops else None
    summary["n"]["stop_rate"] = len(stops)
    return summary


# ----------------------------------------------------------------------------- CLI
def _cmd_skills(args) -> int:
    from herd.inference.loading import load_for_inference, require_tokenizer

    if args.format not in FORMATS:
        raise ValueError(f"--format must be raw or chat, got {args.format!r}")
    if args.limit < 1:
        raise ValueError(f"--limit must be ≥ 1, got {args.limit}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_for_inference(args.model, dtype="float32")
    tok = require_tokenizer(tok, args.model)
    records = run_skills(model, tok, args.format, args.limit, args.limit, args.seed)
    summary = {**aggregate(records, args.format), "model": str(args.model), "seed": args.seed}
    write_records(args.out, records, summary)
    print(json.dumps(summary))
    return 0


def write_records(out: str | Path, records: list[dict], summary: dict) -> None:
    """OUT/records.jsonl (one scored item per line) and OUT/summary.json, each replaced whole: both
    are written into a temporary directory inside OUT first, so a crash never leaves half a file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".results-"))
    try:
        (tmp / "records.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def add_skills_parser(sub) -> argparse.ArgumentParser:
    """`herd eval skills MODEL --out DIR`"""
    p = sub.add_parser("skills", help="digit VQA (1 and 5 images), tool use and stop rate on held-out items",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="model directory")
    p.add_argument("--format", default="chat", help="prompt layout: chat (Llama 4 chat format) or raw (base models)")
    p.add_argument("--limit", type=int, default=40, help="items per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out", required=True, help="output directory (records.jsonl, summary.json)")
    p.set_defaults(func=_cmd_skills)
    return p
