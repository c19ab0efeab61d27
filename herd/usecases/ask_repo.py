"""`herd ask-repo PATH -q QUESTION`: answer a question about a repository from its files.

Idea: long context instead of retrieval. The repository's text files are packed into one prompt,
each behind a path marker, until the token budget is spent; the model reads them all and answers
with the path of the file it means. Whatever did not fit is named, never dropped silently.

Layout of the user turn (one file after another, in path order, then the question):

    <file path="pkg/util.py">
    ...the file's text...
    </file>
    ...
    Question: QUESTION
    Answer with the path of the file.

Files skipped: `.git/`, paths a `.gitignore` (at any depth, git's own matching rules via
pathspec) ignores, binary files (a NUL byte or invalid UTF-8 in the first 8 KiB, as git decides),
empty files. A file that does not fit in what is left of the budget is left out whole (a cut
file would hide its end), and packing continues with the smaller files after it.

    herd ask-repo ~/src/project -q "Where is the retry policy defined?" --model runs/sft
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from herd.data.usecase_data import ASK_REPO_SYSTEM as SYSTEM
from herd.data.usecase_data import file_block, question_block  # the layout SFT trains on (one source)
from herd.usecases.common import Assistant, add_model_args, assistant_from_args, is_binary


@dataclass
class Packed:
    prompt: str
    files: list[str] = field(default_factory=list)  # packed, in prompt order
    left_out: dict[str, str] = field(default_factory=dict)  # path → reason
    tokens: int = 0


def repo_files(root: str | Path) -> tuple[list[Path], dict[str, str]]:
    """→ (text files under root in path order, {relative path: why skipped}); .gitignore applied."""
    import pathspec

    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"repository not found: {root}")
    if not root.is_dir():
        raise ValueError(f"{root} is a file, not a repository directory")
    specs: list[tuple[Path, pathspec.PathSpec]] = []
    files, skipped = [], {}

    def ignored(rel: Path, is_dir: bool) -> bool:
        for base, spec in specs:
            if base == Path(".") or base in rel.parents:
                sub = rel.relative_to(base).as_posix() + ("/" if is_dir else "")
                if spec.match_file(sub):
                    return True
        return False

    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath).relative_to(root)
        gi = Path(dirpath) / ".gitignore"
        if gi.is_file():
            specs.append((here, pathspec.GitIgnoreSpec.from_lines(gi.read_text(errors="replace").splitlines())))
        dirnames[:] = sorted(d for d in dirnames if d != ".git" and not ignored(here / d, True))
        for name in sorted(filenames):
            rel = here / name
            if ignored(rel, False):
                continue
            data = (Path(dirpath) / name).read_bytes()
            if is_binary(data):
                skipped[rel.as_posix()] = "binary"
            elif not data.strip():
                skipped[rel.as_posix()] = "empty"
            else:
                files.append(rel)
    return sorted(files, key=lambda p: p.as_posix()), skipped


def pack(root: str | Path, question: str, count, budget: int) -> Packed:
    """Pack the repository's files into at most `budget` tokens (counted by `count(text)`)."""
    files, skipped = repo_files(root)
    if not files:
        raise ValueError(f"{root} has no text files to read"
                         + (f" ({len(skipped)} skipped: binary or empty)" if skipped else ""))
    tail = question_block(question)
    left = budget - count(tail)
    if left <= 0:
        raise ValueError(f"the question alone takes more than the budget of {budget} tokens")
    out = Packed(prompt="", left_out=dict(skipped))
    blocks = []
    for rel in files:
        path = rel.as_posix()
        block = file_block(path, (Path(root) / rel).read_text(errors="replace"))
        n = count(block)
        if n > left:
            out.left_out[path] = f"over budget ({n} tokens, {left} left)"
            continue
        blocks.append(block)
        out.files.append(path)
        left -= n
        out.tokens += n
    if not out.files:
        raise ValueError(f"no file of {root} fits in the budget of {budget} tokens; raise --context or --budget")
    out.prompt = "".join(blocks) + tail
    out.tokens += count(tail)
    return out


def cited_paths(answer: str, files: list[str]) -> list[str]:
    """Packed paths the answer names (longest first, so 'a/b.py' is not also counted as 'b.py')."""
    found, rest = [], answer
    for p in sorted(files, key=len, reverse=True):
        if p in rest:
            found.append(p)
            rest = rest.replace(p, " ")
    return found


def ask_repo(assistant: Assistant, root: str | Path, question: str, budget: int | None = None) -> dict:
    if not question.strip():
        raise ValueError("the question is empty")
    room = assistant.prompt_budget - assistant.overhead(SYSTEM)
    packed = pack(root, question, assistant.count, min(budget or room, room))
    answer = assistant.ask(packed.prompt, system=SYSTEM)
    return {"answer": answer, "cited": cited_paths(answer, packed.files), "packed": packed.files,
            "left_out": packed.left_out, "prompt_tokens": packed.tokens}


def _cmd(args) -> int:
    repo_files(args.path)  # bad paths fail before the model loads
    result = ask_repo(assistant_from_args(args), args.path, args.question, args.budget)
    if args.json:
        print(json.dumps(result))
        return 0
    print(result["answer"])
    print(f"[{len(result['packed'])} files packed in {result['prompt_tokens']} tokens"
          + (f"; cited: {', '.join(result['cited'])}" if result["cited"] else "") + "]", file=sys.stderr)
    if result["left_out"]:
        print(f"[left out {len(result['left_out'])}: "
              + ", ".join(f"{p} ({why})" for p, why in result["left_out"].items()) + "]", file=sys.stderr)
    return 0


def add_subcommand(sub) -> None:
    p = sub.add_parser("ask-repo", help="answer a question about a repository (files packed into the context)",
                       description="Pack a repository's text files (skipping .gitignored and binary ones) with "
                       "path markers into the context up to a token budget, say what was left out, and answer "
                       "with file paths.")
    p.add_argument("path", help="repository directory")
    p.add_argument("-q", "--question", required=True)
    p.add_argument("--budget", type=int, help="tokens for the packed files + question (default: all the context "
                   "leaves after the answer)")
    add_model_args(p)
    p.set_defaults(func=_cmd)
