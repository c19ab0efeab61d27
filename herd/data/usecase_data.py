"""SFT examples of the two text use cases, in exactly the prompts the commands build.

`herd ask-repo` and `herd summarize` (herd/usecases/) put one user turn in front of the model;
`herd score-usecases` scores them on held-out stdlib functions. A model can only be expected to
do what SFT showed it, so the SFT mixture (herd/data/chat_data.py, tasks `ask_repo` and
`summarize`) carries the same turns, built from the same stdlib functions, and this file is the
one source of both the prompt layout and the examples:

    ask_repo   system ASK_REPO_SYSTEM; user: a few stdlib functions, each alone in a file at its
               stdlib path (file_block), in path order as `pack` orders a repository, then
               question_block("In which file is the function NAME defined?"); assistant: the
               path. Verifier "exact". The packed files take 1/4 to all of `max_chars`
               characters (1,400 ≈ 370 tokens of the speedrun's 8,192-token BPE, 3.8 characters
               a token on stdlib code), so every dialog fits SFT rows of 512 tokens; the scored
               prompts are 1,024 and 2,048 tokens (length generalisation is part of the test).
    summarize  user: SUMMARIZE_INSTRUCTION + the function's code with its docstring removed
               (ast); assistant: the docstring's first line. Reference answer only (no
               verifier), as code_qa's docstring questions.

Splits follow the key "PATH.NAME" (herd.data.chat_data.split_of), the key of code_qa and of
herd.usecases.score.held_out_functions, so no function that score-usecases asks about is in the
train split here. The stdlib itself is pre-training text: what is held out is the question.
"""

from __future__ import annotations

import ast
import copy
import functools
import random

ASK_REPO_SYSTEM = "You answer questions about a code repository. Name files by their path."
ASK_REPO_QUESTION = "In which file is the function {name} defined?"
SUMMARIZE_INSTRUCTION = "Summarize the following text in one or two sentences.\n\n"


def file_block(path: str, text: str) -> str:
    """One packed file: `<file path="PATH">` … `</file>`."""
    return f'<file path="{path}">\n{text.rstrip()}\n</file>\n'


def question_block(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer with the path of the file."


@functools.lru_cache(maxsize=1)
def stdlib_functions() -> tuple[dict, ...]:
    """[{path, name, source, doc, node}]: every unambiguous (defined in one file) public top-level
    stdlib function under 2,000 characters; doc is its docstring's first line ("" when none)."""
    from herd.data.sources import stdlib_files

    found, seen = [], {}
    for path, file in stdlib_files():
        if path.startswith("test") or "/test" in path:
            continue
        text = file.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                seen[node.name] = seen.get(node.name, 0) + 1
                found.append({"path": path, "name": node.name, "source": ast.get_source_segment(text, node) or "",
                              "doc": (ast.get_docstring(node) or "").strip().split("\n")[0].strip(), "node": node})
    return tuple(f for f in found if seen[f["name"]] == 1 and f["source"] and len(f["source"]) < 2000)


def without_docstring(fn: dict) -> str:
    """The function's code with its docstring removed (ast.unparse of the trimmed node)."""
    node = fn["node"]
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    trimmed = copy.copy(node)
    trimmed.body = body or [ast.Pass()]
    return ast.unparse(trimmed)


def ask_repo_examples(n: int, seed: int = 0, max_chars: int = 1400) -> list[dict]:
    """`n` ask-repo dialogs: the target's file among distractor files (other stdlib paths)."""
    fns = stdlib_functions()
    rng = random.Random(seed)
    targets = [f for f in fns if len(file_block(f["path"], f["source"])) <= max_chars // 2]
    rng.shuffle(targets)
    out = []
    for k, fn in enumerate(targets[:n]):
        left = rng.randint(max_chars // 4, max_chars) - len(file_block(fn["path"], fn["source"]))
        files, used = [fn], {fn["path"]}
        for d in rng.sample(fns, min(80, len(fns))):
            n_chars = len(file_block(d["path"], d["source"]))
            if d["path"] not in used and n_chars <= left:
                files.append(d)
                used.add(d["path"])
                left -= n_chars
        files.sort(key=lambda f: f["path"])
        user = "".join(file_block(f["path"], f["source"]) for f in files) + \
            question_block(ASK_REPO_QUESTION.format(name=fn["name"]))
        out.append({"id": f"ask_repo/{k:06d}", "task": "ask_repo", "key": f"{fn['path']}.{fn['name']}",
                    "messages": [{"role": "system", "content": ASK_REPO_SYSTEM}, {"role": "user", "content": user},
                                 {"role": "assistant", "content": fn["path"]}],
                    "answer": fn["path"], "verifier": "exact"})
    return out


def summarize_examples(n: int, seed: int = 0, max_chars: int = 1400) -> list[dict]:
    """`n` summarize dialogs: code without its docstring → the docstring's first line."""
    fns = [f for f in stdlib_functions() if len(f["doc"].split()) >= 3]
    rng = random.Random(seed)
    rng.shuffle(fns)
    out = []
    for fn in fns:
        code = without_docstring(fn)
        if len(code) > max_chars:
            continue
        out.append({"id": f"summarize/{len(out):06d}", "task": "summarize", "key": f"{fn['path']}.{fn['name']}",
                    "messages": [{"role": "user", "content": SUMMARIZE_INSTRUCTION + code},
                                 {"role": "assistant", "content": fn["doc"]}]})
        if len(out) == n:
            break
    return out
