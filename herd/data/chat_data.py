"""Chat data for supervised fine-tuning, built offline from installed packages: `herd data sft --out DIR`.

Every example is one JSON line in the TRL / OpenAI `messages` shape, plus herd's bookkeeping:

    {"id": "chain_sum/000042", "task": "chain_sum",
     "messages": [{"role": "user", "content": "State the final answer ...: 4 - 1 ="},
                  {"role": "assistant", "content": "3"}],
     "answer": "3", "verifier": "reasoning_gym:chain_sum", "entry": {...}}     # verifiable items only

Images are content parts `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`
(or `{"type": "image", "image": "path.png"}`, a path relative to the JSONL file); tool calls use
OpenAI's `tool_calls` shape, which herd.chat writes in the Llama 4 tool-call format.

Tasks (the sources are installed packages; nothing is downloaded):

    chatterbot       conversations of the chatterbot-corpus package (its english/*.yml)
    chain_sum        reasoning-gym: one-digit two-term sums and differences   } verified by
    spell_backward   reasoning-gym: spell a 3–5 letter word backwards         } reasoning-gym's
    letter_counting  reasoning-gym: count a letter in a few words             } score_answer
    digits_vqa       1–5 bundled handwritten digits in one user turn: which digits, their sum,
                     the largest (images of the pre-training *validation* digits never appear in
                     the train split here, so test accuracy is about unseen images)
    code_qa          CPython stdlib: in which module is function X defined (verified), what X's
                     docstring says (reference answer only)
    calculator       tool use: user asks, assistant calls `calculator`, the tool answers, the
                     assistant states the result (verified: the number in the final reply)
    longctx          retrieval dialogs from herd.data.longctx (RULER niah/vt) at a given length;
                     needs a tokenizer (`--tokenizer`), since lengths are exact in its tokens
    ask_repo         the `herd ask-repo` turn: stdlib functions packed as files, "in which file is
                     NAME defined?" → the path (verified; herd/data/usecase_data.py)
    summarize        the `herd summarize` turn: a function's code without its docstring → the
                     docstring's first line (reference answer only; herd/data/usecase_data.py)

Splits: each item's key (the question, the conversation's first line, the image ids) is hashed
(herd.data.splits.split_hash): below 0.1 → test, below 0.2 → val, else train. Keys never cross
splits, so repeated questions (chatterbot has several answers to "Hi, how is it going?") stay on
one side. Files: DIR/train.jsonl, DIR/val.jsonl, DIR/test.jsonl, DIR/summary.json (counts).

Verification (`verify(example, reply) -> float` in [0, 1]) is what pass@k pruning, the held-out
accuracy of benchmarks/sft_pruning.py, and on-policy DPO pairs use.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import random
import re
from pathlib import Path

from herd.data.splits import split_hash

SPLITS = ("train", "val", "test")
RG_TASKS = {  # reasoning-gym generators a tiny model can learn, with settings that keep them small
    "chain_sum": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1),
    "spell_backward": dict(min_word_len=3, max_word_len=5),
    "letter_counting": dict(min_words=2, max_words=4),
}
TASKS = ("chatterbot", *RG_TASKS, "digits_vqa", "code_qa", "calculator", "longctx", "ask_repo", "summarize")
CALCULATOR_TOOL = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression with + - * and integers.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}


def split_of(key: str) -> str:
    h = split_hash(key, salt="herd-sft-v1")
    return "test" if h < 0.1 else "val" if h < 0.2 else "train"


# ----- tasks --------------------------------------------------------------------------------------
def chatterbot_examples(limit: int | None = None) -> list[dict]:
    """Conversations from chatterbot-corpus (english), user/assistant alternating, ending on the assistant."""
    import yaml

    from herd.data.sources import package_dir

    root = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    out = []
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for i, conv in enumerate(doc.get("conversations") or []):
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            turns = turns[: len(turns) // 2 * 2]
            if not turns:
                continue
            msgs = [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)]
            out.append({"id": f"chatterbot/{path.stem}/{i:04d}", "task": "chatterbot", "messages": msgs,
                        "key": turns[0].lower()})
    return out[:limit]


def reasoning_gym_examples(name: str, n: int, seed: int = 0) -> list[dict]:
    import reasoning_gym

    ds = reasoning_gym.create_dataset(name, size=n, seed=seed + 1, **RG_TASKS[name])
    out, seen = [], set()
    for i in range(n):
        e = ds[i]
        if e["question"] in seen:
            continue
        seen.add(e["question"])
        entry = json.loads(json.dumps({"question": e["question"], "answer": e["answer"],
                                       "metadata": e.get("metadata", {})}, default=str))
        out.append({"id": f"{name}/{i:06d}", "task": name, "key": e["question"],
                    "messages": [{"role": "user", "content": e["question"]},
                                 {"role": "assistant", "content": str(e["answer"])}],
                    "answer": str(e["answer"]), "verifier": f"reasoning_gym:{name}", "entry": entry})
    return out


def png_data_url(image) -> str:
    """uint8 [H, W] (ink = 255) → a PNG data URL."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def digits_vqa_examples(n: int, seed: int = 0, max_images: int = 5) -> list[dict]:
    """Questions about 1–5 digit images in one turn. Images of the pre-training validation split
    (herd.data's split of digit ids) only go to val/test here, train images only to train."""
    from herd.data.images import load_digits
    from herd.data.loader import DataConfig
    from herd.data.splits import validation_mask

    images, labels, ids = load_digits(("sklearn",))
    held = validation_mask(list(ids), DataConfig.val_fraction)
    pools = {False: [i for i in range(len(ids)) if not held[i]], True: [i for i in range(len(ids)) if held[i]]}
    rng = random.Random(seed)
    out = []
    for k in range(n):
        eval_item = k % 5 == 0  # a fifth of the items draw from held-out images (val/test)
        count = rng.randint(1, max_images)
        pick = rng.sample(pools[eval_item], count)
        ds = [int(labels[i]) for i in pick]
        if count == 1:
            q, a = "Which digit is this?", str(ds[0])
        else:
            kind = rng.choice(("which", "sum", "max"))
            q, a = {"which": ("Which digits are these, in order?", " ".join(map(str, ds))),
                    "sum": ("What is the sum of these digits?", str(sum(ds))),
                    "max": ("Which is the largest digit here?", str(max(ds)))}[kind]
        parts = [{"type": "image_url", "image_url": {"url": png_data_url(images[i])}} for i in pick]
        key = "digits:" + ",".join(str(ids[i]) for i in pick) + ":" + q
        split = split_of(key) if eval_item else "train"
        if eval_item and split == "train":
            split = "val" if split_hash(key, "herd-sft-vqa") < 0.5 else "test"
        out.append({"id": f"digits_vqa/{k:06d}", "task": "digits_vqa", "key": key, "split": split,
                    "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": q}]},
                                 {"role": "assistant", "content": a}],
                    "answer": a, "verifier": "exact"})
    return out


def code_qa_examples(n: int, seed: int = 0) -> list[dict]:
    """Where stdlib functions are defined (verified) and what their docstrings say."""
    from herd.data.sources import stdlib_files

    found = []
    for module, path in stdlib_files():
        if module.startswith("test") or ".test" in module:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = (ast.get_docstring(node) or "").strip().split("\n")[0].strip()
                found.append((module, node.name, doc))
    names = {}
    for module, name, _ in found:
        names.setdefault(name, set()).add(module)
    found = [f for f in found if len(names[f[1]]) == 1]  # unambiguous names only
    rng = random.Random(seed)
    rng.shuffle(found)
    out = []
    for k, (module, name, doc) in enumerate(found[:n]):
        if doc and k % 2:
            msgs = [{"role": "user", "content": f"What does the docstring of {module}.{name} say?"},
                    {"role": "assistant", "content": doc}]
            extra = {}
        else:
            msgs = [{"role": "user", "content": f"In which standard-library module is the function {name} defined?"},
                    {"role": "assistant", "content": module}]
            extra = {"answer": module, "verifier": "exact"}
        out.append({"id": f"code_qa/{k:06d}", "task": "code_qa", "key": f"{module}.{name}", "messages": msgs, **extra})
    return out


def calculator_examples(n: int, seed: int = 0) -> list[dict]:
    """Tool use: call → tool result → answer, in OpenAI's tool_calls shape (Llama 4 json format)."""
    rng = random.Random(seed)
    out = []
    system = ("You can call the calculator tool: " + json.dumps(CALCULATOR_TOOL["function"]) +
              "\nTo call it, reply with a JSON function call.")
    for k in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice("+-*")
        expr = f"{a} {op} {b}"
        value = str(eval(expr))  # noqa: S307 — our own integer expression
        call = {"id": f"call_{k}", "type": "function",
                "function": {"name": "calculator", "arguments": json.dumps({"expression": expr})}}
        msgs = [{"role": "system", "content": system},
                {"role": "user", "content": f"What is {expr}?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": f"call_{k}", "content": value},
                {"role": "assistant", "content": f"{expr} = {value}"}]
        out.append({"id": f"calculator/{k:06d}", "task": "calculator", "key": expr, "messages": msgs,
                    "answer": value, "verifier": "last_number", "tools": [CALCULATOR_TOOL]})
    return out


def longctx_examples(tokenizer, n: int, length: int, seed: int = 0) -> list[dict]:
    """Retrieval dialogs from herd.data.longctx (RULER's niah_single_1 and vt) at `length` tokens."""
    from herd.data.longctx import generate_samples

    out = []
    for task in ("niah_single_1", "vt"):
        for s in generate_samples(tokenizer, task, length, n // 2, seed=seed):
            answer = ", ".join(s["answers"])
            out.append({"id": f"longctx/{task}/{s['index']:06d}", "task": "longctx",
                        "key": f"{task}:{s['index']}:{seed}",
                        "messages": [{"role": "user", "content": s["input"]},
                                     {"role": "assistant", "content": f"{s['answer_prefix'].strip()} {answer}."}],
                        "answer": s["answers"], "verifier": "contains"})
    return out


# ----- verification -------------------------------------------------------------------------------
def _last_number(text: str) -> str | None:
    nums = re.findall(r"-?\d+", text)
    return nums[-1] if nums else None


def verify(example: dict, reply: str) -> float | None:
    """Score a model reply to `example` (its last assistant turn withheld): 1.0 right, 0.0 wrong,
    None when the example has no verifier."""
    kind = example.get("verifier")
    if kind is None:
        return None
    reply = reply.strip()
    if kind == "exact":
        return float(reply.rstrip(".").strip().lower() == str(example["answer"]).strip().lower())
    if kind == "last_number":
        return float(_last_number(reply) == str(example["answer"]))
    if kind == "contains":
        answers = example["answer"] if isinstance(example["answer"], list) else [example["answer"]]
        return float(all(str(a) in reply for a in answers))
    if kind.startswith("reasoning_gym:"):
        import reasoning_gym

        score = reasoning_gym.get_score_answer_fn(kind.split(":", 1)[1])
        return float(score(reply, example["entry"]))
    raise ValueError(f"example {example.get('id')}: unknown verifier {kind!r}")


# ----- building the files -------------------------------------------------------------------------
def build(out: str | Path, per_task: int = 1500, seed: int = 0, tasks=TASKS, tokenizer=None,
          longctx_length: int = 1024, progress: bool = True) -> dict:
    """Write DIR/{train,val,test}.jsonl and DIR/summary.json; returns the counts per task and split."""
    from herd.data.longctx import write_jsonl_atomic
    from herd.data import usecase_data

    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown SFT tasks {sorted(unknown)}; known: {', '.join(TASKS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    builders = {
        "chatterbot": lambda: chatterbot_examples(),
        **{name: (lambda name=name: reasoning_gym_examples(name, per_task, seed)) for name in RG_TASKS},
        "digits_vqa": lambda: digits_vqa_examples(per_task, seed),
        "code_qa": lambda: code_qa_examples(per_task, seed),
        "calculator": lambda: calculator_examples(per_task, seed),
        "longctx": lambda: longctx_examples(tokenizer, max(2, per_task // 10), longctx_length, seed),
        "ask_repo": lambda: usecase_data.ask_repo_examples(per_task, seed),
        "summarize": lambda: usecase_data.summarize_examples(per_task, seed),
    }
    rows = {s: [] for s in SPLITS}
    counts: dict = {}
    for task in tasks:
        if task == "longctx" and tokenizer is None:
            if progress:
                print("longctx: skipped (needs --tokenizer: lengths are exact in a tokenizer's tokens)")
            continue
        items = builders[task]()
        for ex in items:
            split = ex.pop("split", None) or split_of(ex.pop("key"))
            ex.pop("key", None)
            rows[split].append(ex)
            counts.setdefault(task, {s: 0 for s in SPLITS})[split] += 1
        if progress:
            print(f"{task:16s} " + "  ".join(f"{s} {counts.get(task, {}).get(s, 0):5d}" for s in SPLITS))
    for split in SPLITS:
        write_jsonl_atomic(rows[split], out / f"{split}.jsonl")
    summary = {"tasks": counts, "seed": seed, "per_task": per_task}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def add_sft_data_parser(sub) -> None:
    """`herd data sft --out DIR`: register on the `herd data` subparsers."""
    p = sub.add_parser("sft", help="build the chat SFT data (messages JSONL, train/val/test per task)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for train.jsonl, val.jsonl, test.jsonl, summary.json")
    p.add_argument("--per-task", type=int, default=1500, help="examples generated per task (chatterbot: all)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ", ".join(TASKS))
    p.add_argument("--tokenizer", default=None, help="tokenizer for the long-context dialogs (else they are skipped)")
    p.add_argument("--longctx-length", type=int, default=1024, help="tokens per long-context dialog")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_sft)


def _cmd_sft(args) -> int:
    tok = None
    if args.tokenizer:
        from herd.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    build(args.out, args.per_task, args.seed, tasks, tok, args.longctx_length)
    print(f"wrote {args.out}/train.jsonl, val.jsonl, test.jsonl")
    return 0
