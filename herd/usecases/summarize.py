"""`herd summarize FILE`: summarize a text document, in one pass when it fits the context and by
map-reduce when it does not.

One pass: the whole document and the instruction in one user turn. Map-reduce (the LangChain /
"Text summarization with LLMs" recipe): split the document at line boundaries into chunks that
each fit the context, summarize every chunk (map, with a progress bar), then summarize the
joined chunk summaries (reduce); when the joined summaries are themselves too long the reduce
step is again a map-reduce over them. The command says which it did (stderr, or `mode` in --json).

    herd summarize notes.txt --model runs/sft
    herd summarize big.log --model runs/sft --context 2048 --json   # {"mode": "map-reduce", "chunks": 7, ...}
"""

from __future__ import annotations

import json
import sys

from herd.data.usecase_data import SUMMARIZE_INSTRUCTION as INSTRUCTION  # the turn SFT trains on (one source)
from herd.usecases.common import Assistant, add_model_args, assistant_from_args, read_text

REDUCE = "These are summaries of consecutive parts of one document. Summarize the whole document in one or two sentences.\n\n"
MAX_LEVELS = 4


def split_chunks(text: str, count, size: int) -> list[str]:
    """Consecutive pieces of `text`, cut after a newline where possible, each ≤ `size` tokens."""
    chunks, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        k = count(line)
        while k > size:  # one very long line: cut it by characters in proportion
            cut = max(1, len(line) * size // (k + 1))
            head, line = line[:cut], line[cut:]
            if cur:
                chunks.append("".join(cur))
                cur, n = [], 0
            chunks.append(head)
            k = count(line)
        if n + k > size and cur:
            chunks.append("".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += k
    if cur:
        chunks.append("".join(cur))
    return [c for c in chunks if c.strip()]


def summarize_text(assistant: Assistant, text: str, progress: bool = True) -> dict:
    """→ {"summary", "mode": "one pass" | "map-reduce", "chunks", "levels", "document_tokens"}."""
    from tqdm import tqdm

    doc_tokens = assistant.count(text)
    room = assistant.prompt_budget - assistant.overhead() - assistant.count(INSTRUCTION)
    if doc_tokens <= room:
        return {"summary": assistant.ask(INSTRUCTION + text), "mode": "one pass", "chunks": 1, "levels": 0,
                "document_tokens": doc_tokens}
    first, level, prompt = None, 0, INSTRUCTION
    while True:
        # slack of 8: tokens at chunk joins may merge differently than counted per line
        size = assistant.prompt_budget - assistant.overhead() - assistant.count(prompt) - 8
        if size < 32:
            raise ValueError(f"the context of {assistant.context} leaves {size} tokens per chunk; raise --context")
        chunks = split_chunks(text, assistant.count, size)
        first = first or len(chunks)
        level += 1
        parts = [assistant.ask(prompt + c) for c in tqdm(chunks, desc=f"map (level {level})", unit="chunk",
                                                        disable=not progress, file=sys.stderr)]
        text, prompt = "\n".join(f"- {p}" for p in parts if p), REDUCE
        if assistant.count(REDUCE + text) <= size or len(chunks) == 1:
            break
        if level >= MAX_LEVELS:
            raise ValueError(f"the summaries still do not fit the context after {level} map-reduce levels")
    return {"summary": assistant.ask(REDUCE + text) if text else "", "mode": "map-reduce",
            "chunks": first, "levels": level, "document_tokens": doc_tokens}

def _cmd(args) -> int:
    text = read_text(args.file)  # bad input fails before the model loads
    result = summarize_text(assistant_from_args(args), text, progress=not args.json)
    if args.json:
        print(json.dumps(result))
        return 0
    how = "one pass" if result["mode"] == "one pass" else f"map-reduce over {result['chunks']} chunks"
    print(f"[{result['document_tokens']} tokens: {how}]", file=sys.stderr)
    print(result["summary"])
    return 0


def add_subcommand(sub) -> None:
    p = sub.add_parser("summarize", help="summarize a text file (one pass, or map-reduce when it is too long)",
                       description="Summarize a text document: one pass when it fits the model's context, "
                       "otherwise chunked map-reduce with a progress bar; says which it did.")
    p.add_argument("file", help="a UTF-8 text file")
    add_model_args(p)
    p.set_defaults(func=_cmd)
