"""Scoring the use cases on held-out stdlib code: `herd score-usecases MODEL --out DIR`.

    herd score-usecases runs/speedrun/dpo --out runs/speedrun/usecases --lengths 1024,2048 --limit 20

Two scores, each through the same library function the command uses (no second code path):

    ask-repo   "In which file is the function NAME defined?" over a small repository built from the
               stdlib: the target function's source in its own stdlib path, plus distractor
               functions (one per file, other stdlib paths) until the packed prompt reaches the
               context length; the files are packed by herd.usecases.ask_repo.pack exactly as
               `herd ask-repo` packs a real repository. Right when the answer cites the target's
               path first. Scored at two context lengths (more files, more to read); the chance
               level (1 / files packed) is reported next to it.
    summarize  code → its docstring's summary line: the function's source with the docstring
               removed (ast), summarized by herd.usecases.summarize.summarize_text, scored with
               ROUGE-L F1 (Google's rouge-score, Porter stemming) against the docstring's first line.

Held out: functions whose "PATH.NAME" key falls in the test split of the SFT data's split rule
(herd.data.chat_data.split_of), so the SFT tasks `code_qa`, `ask_repo` and `summarize` (the last
two are these very prompts, herd/data/usecase_data.py) never asked about them; only names
defined in one stdlib file are used. The stdlib itself is pre-training text: what is held out is
the question, not the code. Targets are the held-out functions short enough to fit the shorter
context on their own (in the speedrun's tokenizer, most are). Writes DIR/records.jsonl (one line per question) and DIR/summary.json:

    {"model": ..., "ask_repo": {"1024": {"accuracy", "chance", "files", "n"}, ...},
     "summarize": {"rougeL_f1": ..., "n": ...}}
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

from herd.data.usecase_data import ASK_REPO_QUESTION as QUESTION
from herd.data.usecase_data import stdlib_functions, without_docstring
from herd.evals.skills import write_records


def held_out_functions(limit: int, seed: int = 0, need_doc: bool = False) -> list[dict]:
    """[{path, name, source, doc, node}] for functions whose key is in the SFT data's test split."""
    from herd.data.chat_data import split_of

    found = [f for f in stdlib_functions() if split_of(f"{f['path']}.{f['name']}") == "test"]
    if need_doc:
        found = [f for f in found if len(f["doc"].split()) >= 3]
    random.Random(seed).shuffle(found)
    return found[:limit]


# ----------------------------------------------------------------------------- ask-repo
def build_repo(root: Path, target: dict, pool: list[dict], count, room: int) -> int:
    """Write the target and distractor functions (one per file) under root while their packed
    blocks fit in `room` tokens, so `pack` keeps them all; → the number of files."""
    from herd.usecases.ask_repo import file_block

    files, used = [target], {target["path"]}
    left = room - count(file_block(target["path"], target["source"]))
    for fn in pool:
        n = count(file_block(fn["path"], fn["source"]))
        if fn["path"] in used or n > left:
            continue
        used.add(fn["path"])
        files.append(fn)
        left -= n
        if left < 64:
            break
    for fn in files:
        p = root / fn["path"]
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(fn["source"] + "\n")
    return len(files)


def score_ask_repo(assistant, functions: list[dict], distractors: list[dict], seed: int = 0) -> list[dict]:
    from herd.usecases.ask_repo import SYSTEM, ask_repo, question_block

    records = []
    rng = random.Random(seed)
    for fn in functions:
        pool = [d for d in distractors if d["path"] != fn["path"]]
        rng.shuffle(pool)
        with tempfile.TemporaryDirectory(prefix="herd-askrepo-") as tmp:
            question = QUESTION.format(name=fn["name"])
            room = assistant.prompt_budget - assistant.overhead(SYSTEM) - assistant.count(question_block(question)) - 8
            build_repo(Path(tmp), fn, pool, assistant.count, room)
            res = ask_repo(assistant, tmp, question)
        cited = res["cited"]
        records.append({"task": "ask_repo", "context": assistant.context, "name": fn["name"], "answer": fn["path"],
                        "reply": res["answer"], "cited": cited, "files": len(res["packed"]),
                        "target_packed": fn["path"] in res["packed"],
                        "score": float(bool(cited) and cited[0] == fn["path"])})
    return records


# ----------------------------------------------------------------------------- summarize
def score_summaries(assistant, functions: list[dict]) -> list[dict]:
    from rouge_score import rouge_scorer

    from herd.usecases.summarize import summarize_text

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    records = []
    for fn in functions:
        res = summarize_text(assistant, without_docstring(fn), progress=False)
        f1 = scorer.score(fn["doc"], res["summary"])["rougeL"].fmeasure
        records.append({"task": "summarize", "name": f"{fn['path']}:{fn['name']}", "answer": fn["doc"],
                        "reply": res["summary"], "mode": res["mode"], "score": f1})
    return records


def aggregate(records: list[dict]) -> dict:
    out: dict = {"ask_repo": {}, "summarize": {}}
    for ctx in sorted({r["context"] for r in records if r["task"] == "ask_repo"}):
        rs = [r for r in records if r["task"] == "ask_repo" and r["context"] == ctx]
        out["ask_repo"][str(ctx)] = {"accuracy": sum(r["score"] for r in rs) / len(rs),
                                     "chance": sum(1 / r["files"] for r in rs) / len(rs),
                                     "files": sum(r["files"] for r in rs) / len(rs), "n": len(rs)}
    rs = [r for r in records if r["task"] == "summarize"]
    if rs:
        out["summarize"] = {"rougeL_f1": sum(r["score"] for r in rs) / len(rs), "n": len(rs)}
    return out


def score_usecases(model: str, lengths: list[int], limit: int = 20, seed: int = 0, max_new_tokens: int = 32,
                   dtype: str = "float32") -> list[dict]:
    from herd.usecases.common import Assistant, load_assistant

    if not lengths or any(n <= max_new_tokens + 64 for n in lengths):
        raise ValueError(f"context lengths must each exceed {max_new_tokens + 64} tokens, got {lengths}")
    first = load_assistant(model, dtype=dtype, context=max(lengths), max_new_tokens=max_new_tokens)
    if max(lengths) > first.context:
        raise ValueError(f"context {max(lengths)} is longer than the model's {first.context}")
    from herd.usecases.ask_repo import SYSTEM, file_block, question_block

    small = Assistant(first.model, first.tokenizer, min(lengths), max_new_tokens)

    def fits(fn: dict) -> bool:  # the target alone must fit the shorter context, with the question
        q = question_block(QUESTION.format(name=fn["name"]))
        return small.count(file_block(fn["path"], fn["source"])) + small.count(q) + small.overhead(SYSTEM) + 72 \
            <= small.prompt_budget

    targets = [f for f in held_out_functions(10**6, seed) if fits(f)][:limit]
    if not targets:
        raise ValueError(f"no held-out function fits a context of {min(lengths)} tokens; use longer --lengths")
    distractors = [f for f in stdlib_functions() if f["name"] not in {t["name"] for t in targets}]
    records = []
    for n in lengths:
        records += score_ask_repo(Assistant(first.model, first.tokenizer, n, max_new_tokens), targets, distractors, seed)
    docs = [f for f in held_out_functions(10**6, seed, need_doc=True) if fits(f)][:limit]
    records += score_summaries(Assistant(first.model, first.tokenizer, max(lengths), max_new_tokens), docs)
    return records


def _cmd(args) -> int:
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if args.limit < 1:
        raise ValueError(f"--limit must be ≥ 1, got {args.limit}")
    records = score_usecases(args.model, lengths, args.limit, args.seed, args.max_new_tokens, args.dtype)
    summary = {"model": str(args.model), "seed": args.seed, **aggregate(records)}
    write_records(args.out, records, summary)
    print(json.dumps(summary))
    return 0


def add_subcommand(sub) -> None:
    p = sub.add_parser("score-usecases", help="score ask-repo (accuracy at two context lengths) and summarize "
                       "(ROUGE-L) on held-out stdlib functions", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model directory")
    p.add_argument("--out", required=True, help="output directory (records.jsonl, summary.json)")
    p.add_argument("--lengths", default="1024,2048", help="ask-repo context lengths (tokens)")
    p.add_argument("--limit", type=int, default=20, help="questions per length, and functions to summarize")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd)
