"""Synthetic long-context tasks: RULER's families built offline from herd's bundled text.

    from herd.data.longctx import generate_samples, TASKS
    samples = generate_samples(tok, "niah_single_2", length=4096, n=10, seed=0)
    samples[0]  # {"index", "task", "input", "answer_prefix", "answers", "length", "depth",
                #  "actual_depth", "seed", "tokens_to_generate", "haystack"}

    herd data longctx --tokenizer llama4 --tasks niah_single_1,vt --lengths 1k,4k --samples 20 --out ruler.jsonl

Idea (RULER, Hsieh et al. 2024, NVIDIA/RULER scripts/data/synthetic/): a claimed context length
is only *effective* if a model can retrieve, trace and aggregate facts placed anywhere in it. Each
task hides a few facts in a haystack, asks for them, and appends an answer prefix so the model
only has to continue ("The special magic numbers for X mentioned in the provided text are").
Scoring is string containment of the reference values (herd/evals/ruler.py), never an LLM judge.

Tasks (RULER's names and settings; `tokens_to_generate` per family as in synthetic.yaml):

    niah_single_1    noise haystack ("The grass is green. ..."), key = word pair, value = 7 digits
    niah_single_2    prose haystack, 7-digit value            niah_single_3   prose, UUID value
    niah_multikey_1  prose + 3 distractor needles (other keys), one asked
    niah_multikey_2  the haystack is distractor needles         niah_multikey_3  same, UUID keys+values
    niah_multivalue  4 values under one key, all asked         niah_multiquery  4 keys, all asked
    vt               variable tracking: 1 chain of 4 hops (VAR ABCDE = 12345, VAR FGHIJ = VAR ABCDE)
    cwe              common words: a numbered word list, the 10 most frequent asked
    fwe              frequent "coded" words drawn from a Zipf law (alpha 2), the top 3 asked
    file_defines     herd's: concatenated CPython stdlib files with `### file:` markers; "which file
                     defines `name`?" answers = [path, qualified name] (repository QA)
    multihop         herd's: a chain of 4 references scattered through prose ("The code for the X
                     is the same as the code for the Y."), answer = the value at the chain's end

Layout of a sample. `input` is the task template with the context inside; a base model sees
`<|begin_of_text|> input answer_prefix` and continues; `length` = those tokens + the task's
`tokens_to_generate`, **exactly**, for the tokenizer given (RULER's max_seq_length, where RULER
stops at "fits"). Exactness: the haystack is a stream of words; a binary search finds the most
words that fit, then single words are appended (or the last one swapped) until the count is
exact. Needles are whole sentences put at a word boundary (moved back to the previous sentence
end when one is near) at `depth` % of the haystack's words; `actual_depth` is the needle's
measured position in tokens of the context. Keys and values are drawn again until each value
occurs exactly once in the input.

Determinism: everything random comes from `random.Random` seeded with (seed, task, length,
index) through SHA-256; never the global RNG or `hash()`. The same seed, tokenizer and bundled
text give the same bytes. The text comes from this machine's packages and CPython, so a new
Python version (file_defines, docs) or data package changes them, as with the token cache.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import re
import string
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
DEPTHS_40 = [round(100 * i / 39, 2) for i in range(40)]  # RULER's 40 evenly spaced depths

# RULER's templates (scripts/data/synthetic/constants.py), "{type}" = numbers | words | uuids.
NIAH_TEMPLATE = ("Some special magic {type} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type} afterwards.\n{context}\n"
                 "What are all the special magic {type} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {type} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type} for {key} is: {value}."
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
               "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
             "are assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n{context}\n"
                "Question: What are the 10 most common words in the above list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                "ignore the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
FILE_TEMPLATE = ("Below are files of a Python repository, each starting with a '### file:' line.\n\n{context}\n"
                 "Question: Which file defines the {kind} `{name}`? Give the file path and the qualified name.")
FILE_PREFIX = " Answer: `{name}` is defined in the file"
HOP_TEMPLATE = ("Some codes are hidden within the following text, some given through others. Follow the chain.\n"
                "{context}\nQuestion: What is the code for the {query}?")
HOP_PREFIX = " Answer: The code for the {query} is"

# Word lists for keys (RULER draws adjective-noun pairs from `wonderwords`; these are ours).
ADJECTIVES = ("able acid angry awful bitter black brave brief bright broad broken busy calm cheap clean clear "
              "clever cold cool crazy cruel curly damp dark dear deep dirty dry dull eager early easy empty "
              "equal fair false famous fancy fast fat fierce flat fresh full funny gentle giant glad golden good "
              "grand great green grumpy happy hard heavy high hollow holy hot huge humble icy idle jolly kind "
              "large late lazy light little lively long loud lovely low lucky mad mighty modern narrow nasty "
              "neat nervous new nice noisy odd old open pale plain polite poor proud purple quick quiet rapid "
              "rare raw red rich rough round royal rude sad safe salty sharp shiny short shy silent silly slow "
              "small smooth soft solid sour spicy steep sticky stiff strange strong sweet swift tall tame thick "
              "thin tidy tiny tired tough ugly vast violet warm weak wet white wide wild wise witty young").split()
NOUNS = ("acorn anchor angle apple arrow badge bakery banana basket beach beard bell berry blanket bottle "
         "bridge brush bucket butter cabin camera candle canoe carpet castle cherry circle cliff cloud coast "
         "coffee comet copper cotton crayon crown cup curtain desert diamond dinner dolphin donkey dragon "
         "drum eagle engine falcon feather fence ferry field flute forest fountain garden garlic ghost "
         "glacier glove goat grape guitar hammer harbor helmet hill honey island jacket jungle kettle kitten "
         "ladder lantern lemon library lion lizard magnet mango marble meadow melon mirror monkey mountain "
         "needle ocean onion orange otter owl paddle palace panda parrot pebble pencil pepper piano pillow "
         "planet pocket potato puzzle rabbit radio rainbow river rocket saddle sailor salmon sandal saucer "
         "scarf shovel silver spider spoon squirrel statue stove sugar table teapot temple thimble tiger "
         "tomato tower tractor trumpet tulip turtle umbrella valley violin wagon walnut whale window wizard").split()


@dataclass(frozen=True)
class Task:
    name: str
    family: str  # niah | vt | cwe | fwe | file | hop
    tokens_to_generate: int
    haystack: str  # default haystack: noise | needles | prose | words | python
    value: str = "numbers"  # niah values: numbers | words | uuids
    keys: str = "words"  # niah keys: words | uuids
    num_keys: int = 1  # needles with different keys (the first is asked unless num_queries > 1)
    num_values: int = 1  # values per key
    num_queries: int = 1  # keys asked


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("niah_single_1", "niah", 128, "noise"),
    Task("niah_single_2", "niah", 128, "prose"),
    Task("niah_single_3", "niah", 128, "prose", value="uuids"),
    Task("niah_multikey_1", "niah", 128, "prose", num_keys=4),
    Task("niah_multikey_2", "niah", 128, "needles"),
    Task("niah_multikey_3", "niah", 128, "needles", value="uuids", keys="uuids"),
    Task("niah_multivalue", "niah", 128, "prose", num_values=4),
    Task("niah_multiquery", "niah", 128, "prose", num_keys=4, num_queries=4),
    Task("vt", "vt", 30, "noise"),
    Task("cwe", "cwe", 120, "words"),
    Task("fwe", "fwe", 50, "words"),
    Task("file_defines", "file", 32, "python"),
    Task("multihop", "hop", 32, "prose"),
]}
NEEDLE_TASKS = tuple(n for n, t in TASKS.items() if t.family == "niah")
PROSE_SOURCES = ("bible", "shakespeare", "docs")


def parse_tasks(text: str | list[str]) -> list[str]:
    """'niah_single_1,vt' or 'all' or 'niah' (every niah_* task) → task names; unknown names → ValueError."""
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    out: list[str] = []
    for n in names:
        if n == "all":
            out += list(TASKS)
        elif n == "niah":
            out += list(NEEDLE_TASKS)
        elif n in TASKS:
            out.append(n)
        else:
            raise ValueError(f"unknown task {n!r}; choose from {', '.join(TASKS)} (or 'all', 'niah')")
    if not out:
        raise ValueError("no tasks given")
    return list(dict.fromkeys(out))


def parse_lengths(text: str | list) -> list[int]:
    """'1k,4k,16k' → [1024, 4096, 16384] (k = 1024, as RULER's 4K = 4096); plain integers too."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for p in parts:
        s = str(p).strip().lower()
        if not s:
            continue
        mult = 1024 if s.endswith("k") else 1024 * 1024 if s.endswith("m") else 1
        try:
            n = int(float(s.rstrip("km")) * mult)
        except ValueError:
            raise ValueError(f"bad length {p!r}: expected an integer or a number with k/m (e.g. 4k)") from None
        if n < 1:
            raise ValueError(f"lengths must be positive, got {p!r}")
        out.append(n)
    if not out:
        raise ValueError("no lengths given")
    return out


def parse_depths(text: str | list) -> list[float]:
    """'0,50,100' → [0.0, 50.0, 100.0]; 'ruler' → RULER's 40 evenly spaced depths."""
    if isinstance(text, str) and text.strip() == "ruler":
        return list(DEPTHS_40)
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        out = [float(p) for p in parts if str(p).strip()]
    except ValueError:
        raise ValueError(f"bad depths {text!r}: expected percentages like 0,50,100") from None
    if not out or any(not 0 <= d <= 100 for d in out):
        raise ValueError(f"depths must be percentages in [0, 100], got {text!r}")
    return out


# ----------------------------------------------------------------------------- randomness


def rng_for(*parts) -> random.Random:
    """A Random seeded from the SHA-256 of the parts (stable across processes and machines)."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _word_pair(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _draw(kind: str, rng: random.Random) -> str:
    return {"numbers": _number, "words": _word_pair, "uuids": _uuid}[kind](rng)


# ----------------------------------------------------------------------------- haystacks

_WORD = re.compile(r"\S+\s*")


@functools.lru_cache(maxsize=8)
def _source_text(source: str) -> tuple[str, ...]:
    from herd.data.sources import load_documents

    return tuple(d.text.strip() for d in load_documents(source) if d.text.strip())


class WordStream:
    """An endless, deterministic stream of haystack words ("word" + its trailing whitespace)."""

    def __init__(self, make_chunk: Callable[[int], str]):
        self._make, self._words, self._chunks = make_chunk, [], 0

    def __getitem__(self, i: int) -> str:
        while i >= len(self._words):
            self._words += _WORD.findall(self._make(self._chunks))
            self._chunks += 1
        return self._words[i]

    def take(self, n: int) -> list[str]:
        if n > 0:
            self[n - 1]
        return self._words[:n]


def noise_stream() -> WordStream:
    return WordStream(lambda i: NOISE * 64)


def prose_stream(source: str, rng: random.Random) -> WordStream:
    """Documents of a bundled prose source, from a random start, in order (wrapping around)."""
    if source not in PROSE_SOURCES:
        raise ValueError(f"unknown prose haystack {source!r}; choose from {', '.join(PROSE_SOURCES)}")
    docs = _source_text(source)
    start = rng.randrange(len(docs))
    return WordStream(lambda i: docs[(start + i) % len(docs)] + "\n\n")


@functools.lru_cache(maxsize=1)
def _stdlib_lines() -> tuple[tuple[str, tuple[tuple[str, str | None, str | None], ...]], ...]:
    """Per stdlib file: (path, lines) where each line is (text, kind, qualified name) for def/class lines."""
    from herd.data.sources import stdlib_files

    out = []
    head = re.compile(r"^(\s*)(?:async\s+)?(def|class)\s+([A-Za-z_]\w*)")
    for rel, path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        lines, stack = [], []  # stack: (indent, name)
        for line in text.splitlines(keepends=True):
            m = head.match(line)
            if m:
                indent = len(m.group(1).expandtabs())
                while stack and stack[-1][0] >= indent:
                    stack.pop()
                qual = ".".join([s[1] for s in stack] + [m.group(3)])
                stack.append((indent, m.group(3)))
                lines.append((line, "function" if m.group(2) == "def" else "class", qual))
            else:
                lines.append((line, None, None))
        if not lines[-1][0].endswith("\n"):
            lines[-1] = (lines[-1][0] + "\n", lines[-1][1], lines[-1][2])
        out.append((rel, tuple(lines)))
    return tuple(out)


# ----------------------------------------------------------------------------- fitting to a length


class TokenCount:
    """Token count of the base layout: <|begin_of_text|> + input + answer_prefix."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def __call__(self, text: str) -> int:
        return 1 + len(self.tok.encode(text))


def fit(render: Callable[[list[str]], str], stream, target: int, count: Callable[[str], int],
        fill=None, what: str = "") -> list[str]:
    """Most words of `stream` whose rendered prompt has exactly `target` tokens → those words.

    Binary search on the number of words, then single words from `fill` (default: the stream
    after the cut) are appended while they keep the count ≤ target, restarting a few words
    back with other candidates when a join's merged tokens make the last gap unclosable."""
    empty = count(render([]))
    if empty > target:
        raise ValueError(f"length too short for {what}: the template alone takes {empty} tokens, "
                         f"more than the {target} available for the prompt")
    lo, hi = 0, 64  # count(render(words[:lo])) <= target < count(render(words[:hi]))
    while count(render(stream.take(hi))) <= target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(render(stream.take(mid))) <= target:
            lo = mid
        else:
            hi = mid
    fill = fill or (lambda j: stream[lo + 1 + j])
    closest = count(render(stream.take(lo)))
    # Greedy: append candidate words that keep the count ≤ target. Joins can merge tokens (",\n"
    # is one token, ", and\n" three), so when a deficit cannot be closed, restart a few words back
    # with other candidates: the end boundary changes and some start closes it.
    for back in range(0, 32):
        words = stream.take(max(lo - back, 0))
        have, j = count(render(words)), 0
        while have < target and j < 48:
            # far from the target: take the first word that fits; within 8 tokens, look a few
            # words further for one that lands exactly (a list entry is ≥ 3 tokens, a word 1–3)
            first = None
            for t in range(12 if target - have <= 8 else 1):
                cand, j = fill(back * 48 + j), j + 1
                c = count(render(words + [cand]))
                if c == target:
                    return words + [cand]
                if c < target and first is None:
                    first = (cand, c)
            if first is None:
                if target - have > 8:
                    continue
                break
            words, have = words + [first[0]], first[1]
        if have == target:
            return words
        closest = max(closest, have)
    have = closest
    raise ValueError(f"could not fit {what} to exactly {target} tokens (closest {have})")


def _insert_at(words: list[str], pos: int) -> int:
    """Word index ≤ pos just after a sentence end, if one is within 40 words; else pos."""
    for i in range(pos, max(pos - 40, 0) - 1, -1):
        if i == 0 or re.search(r"[.!?]\s*$|\n\s*$", words[i - 1]):
            return i
    return pos


def _join(words: list[str], needles: list[tuple[int, str]]) -> str:
    """Words with needle sentences inserted before the given word indices (stable order)."""
    out, k = [], 0
    needles = sorted(needles, key=lambda x: x[0])
    for i in range(len(words) + 1):
        while k < len(needles) and needles[k][0] == i:
            sep = "" if (not out or out[-1].endswith((" ", "\n"))) else " "
            out.append(sep + needles[k][1] + " ")
            k += 1
        if i < len(words):
            out.append(words[i])
    return "".join(out).rstrip()


# ----------------------------------------------------------------------------- the tasks


@dataclass
class Prompt:
    input: str
    answer_prefix: str
    answers: list[str]
    needle: str | None = None  # the sentence whose position is the sample's depth


def _niah(task: Task, rng: random.Random, depth: float, stream, source: str):
    n_vals = task.num_values
    used: set[str] = set()

    def fresh(kind):
        while True:
            v = _draw(kind, rng)
            if v not in used:
                used.add(v)
                return v

    keys = [fresh(task.keys) for _ in range(task.num_keys)]
    values = [[fresh(task.value) for _ in range(n_vals)] for _ in keys]
    needles = [NEEDLE.format(type=task.value, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    queried = keys[: task.num_queries]
    answers = [v for vs in values[: task.num_queries] for v in vs]
    query = ", ".join(queried[:-1]) + (" and " + queried[-1] if len(queried) > 1 else queried[-1])
    # where the other needles go: fixed fractions drawn once (they scale with the haystack)
    others = [rng.random() * 100 for _ in needles[1:]]
    if task.haystack == "needles":  # the haystack is distractor needles of other keys
        def sentence(i, r=random.Random(rng.getrandbits(64))):
            k, v = _draw(task.keys, r), _draw(task.value, r)
            while k in used or v in used:
                k, v = _draw(task.keys, r), _draw(task.value, r)
            return NEEDLE.format(type=task.value, key=k, value=v) + " "
        stream = WordStream(lambda i: "".join(sentence(i) for _ in range(32)))

    def render(words):
        n = len(words)
        places = [(_insert_at(words, round(depth / 100 * n)), needles[0])]
        places += [(_insert_at(words, round(d / 100 * n)), s) for d, s in zip(others, needles[1:])]
        ctx = _join(words, places)
        return NIAH_TEMPLATE.format(type=task.value, context=ctx, query=query) + \
            NIAH_PREFIX.format(type=task.value, query=query)

    prefix = NIAH_PREFIX.format(type=task.value, query=query)
    return render, stream, prefix, answers, needles[0]


def _vt(task: Task, rng: random.Random, depth: float, stream, source: str, hops: int = 4):
    names: list[str] = []
    while len(names) < hops + 1:
        n = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if n not in names:
            names.append(n)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    prefix = VT_PREFIX.format(num_v=len(names), query=value)

    def render(words):
        n = len(words)
        places = [(_insert_at(words, round(n * (i + 0.5) / len(chain))), s) for i, s in enumerate(chain)]
        return VT_TEMPLATE.format(context=_join(words, places), query=value) + prefix

    return render, stream, prefix, names, chain[0]


@functools.lru_cache(maxsize=1)
def _english_words() -> tuple[str, ...]:
    """Distinct lowercase words (4–10 letters) of the KJV, in order of first appearance."""
    seen: dict[str, None] = {}
    for doc in _source_text("bible"):
        for w in re.findall(r"[a-z]{4,10}", doc):
            seen.setdefault(w)
    return tuple(seen)


def _cwe(task: Task, rng: random.Random, depth: float, stream, source: str, target: int, count):
    vocab = list(_english_words())
    rng.shuffle(vocab)
    common, pool = vocab[:10], vocab[10:]
    # RULER: 10 common words × 30 + uncommon × 3; scaled down so the common part is ≤ ~half the budget
    per_entry = max(2, count(" 100. " + common[0]) - 1)
    budget = max(0, target - count(CWE_TEMPLATE + CWE_PREFIX)) // per_entry
    freq_cw = max(2, min(30, budget // 20))
    freq_ucw = max(1, min(3, freq_cw // 10))
    half = len(pool) // 2
    uncommon, singles = pool[:half], pool[half:]
    order_seed = rng.getrandbits(64)

    def render(words):
        n_unc = sum(1 for w in words if not w.startswith("\0"))
        entries = common * freq_cw + uncommon[:n_unc] * freq_ucw
        random.Random(order_seed + len(entries)).shuffle(entries)
        entries += [w[1:] for w in words if w.startswith("\0")]  # singles (fill) go last, once each
        ctx = " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries))
        return CWE_TEMPLATE.format(context=ctx) + CWE_PREFIX

    class Uncommon:
        def take(self, n):
            if n > len(uncommon):
                raise ValueError("length too long for cwe's word list")
            return [str(i) for i in range(n)]

        def __getitem__(self, i):
            return str(i)

    return render, Uncommon(), CWE_PREFIX, common, None, (lambda j: "\0" + singles[j % len(singles)])


def _fwe(task: Task, rng: random.Random, depth: float, stream, source: str, alpha: float = 2.0):
    vocab_size = 800
    vocab: list[str] = []
    while len(vocab) < vocab_size:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(6))
        if w not in vocab:
            vocab.append(w)
    weights = [1 / (r + 1) ** alpha for r in range(vocab_size)]
    r2 = random.Random(rng.getrandbits(64))

    def chunk(i):
        ws = r2.choices(vocab, weights=weights, k=256)
        return " ".join(" ".join(ws[j:j + 8]) + " ...." for j in range(0, 256, 8)) + " "

    stream = WordStream(chunk)
    rank = {w: i for i, w in enumerate(vocab)}

    def answers_of(words):
        c = Counter(w.strip() for w in words if w.strip() != "....")
        return [w for w, _ in sorted(c.items(), key=lambda kv: (-kv[1], rank[kv[0]]))[:3]]

    def render(words):
        return FWE_TEMPLATE.format(context="".join(words).rstrip()) + FWE_PREFIX

    return render, stream, FWE_PREFIX, answers_of, None


def _file(task: Task, rng: random.Random, depth: float, stream, source: str):
    files = list(_stdlib_lines())
    rng.shuffle(files)
    lines: list[tuple[str, str | None, str | None, str]] = []

    def chunk(i):
        rel, ls = files[i % len(files)]
        if i == 0:  # the first file starts at its first definition, so short contexts hold one
            ls = ls[next((k for k, (_, kind, _q) in enumerate(ls) if kind), 0):]
        lines.append((f"### file: {rel}\n", None, None, rel))
        lines.extend((t, k, q, rel) for t, k, q in ls)
        lines.append(("\n", None, None, rel))
        return "".join(t for t, *_ in lines[len(lines) - len(ls) - 2:])

    class Lines:
        """The files as a stream of lines (each line one 'word' of the fit)."""

        def __init__(self):
            self.n = 0

        def __getitem__(self, i):
            while i >= len(lines):
                chunk(self.n)
                self.n += 1
            return lines[i][0]

        def take(self, n):
            if n > 0:
                self[n - 1]
            return [t for t, *_ in lines[:n]]

    st = Lines()
    chosen: dict[int, tuple[str, str, str, str]] = {}

    def target_of(n, text):
        defs = Counter(re.findall(r"(?m)^\s*(?:async\s+)?(?:def|class)\s+([A-Za-z_]\w*)", text))
        order = sorted(range(n), key=lambda i: (abs(i - depth / 100 * n), i))
        for i in order:
            t, kind, qual, rel = lines[i]
            if kind and defs[qual.rsplit(".", 1)[-1]] == 1:
                return kind, qual.rsplit(".", 1)[-1], qual, rel, t
        return None

    def render(words):
        n = len(words)
        ctx = "".join(words).rstrip()
        got = target_of(n, ctx)
        if got is None:
            kind, name = "function", "?"
        else:
            kind, name = got[0], got[1]
            chosen[n] = got
        return FILE_TEMPLATE.format(context=ctx, kind=kind, name=name) + FILE_PREFIX.format(name=name)

    def answers_of(words):
        got = chosen.get(len(words))
        if got is None:
            raise ValueError("length too short for file_defines: no uniquely defined name in the context")
        return [got[3], got[2]], got[4], FILE_PREFIX.format(name=got[1])

    return render, st, None, answers_of, None


def _hop(task: Task, rng: random.Random, depth: float, stream, source: str, hops: int = 4):
    used: set[str] = set()
    keys: list[str] = []
    while len(keys) < hops + 1:
        k = _word_pair(rng)
        if k not in used:
            used.add(k)
            keys.append(k)
    value = _number(rng)
    sents = [f"The code for the {keys[i]} is the same as the code for the {keys[i + 1]}." for i in range(hops)]
    sents.append(f"The code for the {keys[-1]} is {value}.")
    spots = [rng.random() * 100 for _ in sents[:-1]]
    prefix = HOP_PREFIX.format(query=keys[0])

    def render(words):
        n = len(words)
        places = [(_insert_at(words, round(d / 100 * n)), s) for d, s in zip(spots, sents[:-1])]
        places.append((_insert_at(words, round(depth / 100 * n)), sents[-1]))
        return HOP_TEMPLATE.format(context=_join(words, places), query=keys[0]) + prefix

    return render, stream, prefix, [value], sents[-1]


# ----------------------------------------------------------------------------- samples


def _measured_depth(tokenizer, text: str, needle: str | None, context_start: str, context_end: str) -> float | None:
    """Position of the needle in tokens of the context, in % (None when there is no needle)."""
    if needle is None:
        return None
    a = text.index(context_start) + len(context_start)
    b = text.rindex(context_end)
    at = text.index(needle)
    before = len(tokenizer.encode(text[a:at]))
    total = len(tokenizer.encode(text[a:b]))
    return round(100 * before / max(total, 1), 2)


def make_sample(tokenizer, task: str, length: int, *, seed: int = 0, index: int = 0, depth: float = 50.0,
                haystack: str | None = None) -> dict:
    """One sample of `task` whose base layout is exactly `length` tokens with the generation budget."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    t = TASKS[task]
    if not 0 <= depth <= 100:
        raise ValueError(f"depth must be a percentage in [0, 100], got {depth}")
    target = length - t.tokens_to_generate
    if target < 1:
        raise ValueError(f"length {length} too short for {task}: it generates {t.tokens_to_generate} tokens")
    source = haystack or ("bible" if t.haystack == "prose" else t.haystack)
    if t.haystack == "prose" and source not in PROSE_SOURCES:
        raise ValueError(f"unknown prose haystack {source!r} for {task}; choose from {', '.join(PROSE_SOURCES)}")
    if t.haystack != "prose" and haystack not in (None, t.haystack):
        raise ValueError(f"task {task} has a fixed haystack ({t.haystack}); --haystack applies to prose tasks")
    count = TokenCount(tokenizer)
    rng = rng_for(seed, task, length, index, depth, source)
    stream = prose_stream(source, rng) if t.haystack == "prose" else noise_stream()
    what = f"{task} at length {length}"
    fill = None
    if t.family == "cwe":
        render, stream, prefix, answers, needle, fill = _cwe(t, rng, depth, stream, source, target, count)
    else:
        render, stream, prefix, answers, needle = {"niah": _niah, "vt": _vt, "fwe": _fwe, "file": _file,
                                                   "hop": _hop}[t.family](t, rng, depth, stream, source)
    words = fit(render, stream, target, count, fill=fill, what=what)
    text = render(words)
    if callable(answers):
        got = answers(words)
        ans, needle_, prefix_ = got if isinstance(got, tuple) else (got, needle, prefix)
    else:
        ans, needle_, prefix_ = answers, needle, prefix
    body = text[: len(text) - len(prefix_)]
    if t.family in ("niah", "hop") and any(body.count(v) != 1 for v in ans):
        raise ValueError(f"{what}: a needle value occurs more than once (haystack collision); try another seed")
    n_tokens = count(text) + t.tokens_to_generate
    assert n_tokens == length, (n_tokens, length)
    actual = None
    if needle_ is not None and t.family in ("niah", "hop", "file"):
        start = {"niah": "afterwards.\n", "hop": "Follow the chain.\n", "file": "'### file:' line.\n\n"}[t.family]
        end = "\nQuestion:" if t.family != "niah" else "\nWhat are all the special magic"
        actual = _measured_depth(tokenizer, body, needle_, start, end)
    return {"index": index, "task": task, "input": body, "answer_prefix": prefix_, "answers": list(ans),
            "length": length, "depth": depth if t.family in ("niah", "hop", "file") else None,
            "actual_depth": actual, "seed": seed, "tokens_to_generate": t.tokens_to_generate,
            "haystack": source}


def generate_samples(tokenizer, task: str, length: int, n: int, *, seed: int = 0, depths=None,
                     haystack: str | None = None) -> list[dict]:
    """n samples; sample i sits at depths[i % len(depths)] (default: RULER's 40 depths)."""
    if n < 1:
        raise ValueError(f"the number of samples must be ≥ 1, got {n}")
    depths = list(depths) if depths else DEPTHS_40
    return [make_sample(tokenizer, task, length, seed=seed, index=i, depth=depths[i % len(depths)],
                        haystack=haystack) for i in range(n)]


def write_jsonl_atomic(rows, path) -> Path:
    """Write rows as JSONL through a temporary file and a rename (no half-written file on failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_samples(path) -> list[dict]:
    """Samples from a JSONL file; a line without answers (or input) → ValueError naming the line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object")
            for key in ("input", "answers", "task", "length"):
                if key not in row:
                    raise ValueError(f"{path}:{i}: sample has no {key!r}")
            if not isinstance(row["answers"], list) or not row["answers"]:
                raise ValueError(f"{path}:{i}: 'answers' must be a non-empty list of strings")
            row.setdefault("answer_prefix", "")
            row.setdefault("tokens_to_generate", TASKS[row["task"]].tokens_to_generate if row["task"] in TASKS
                           else 32)
            out.append(row)
    if not out:
        raise ValueError(f"{path}: no samples")
    return out


# ----------------------------------------------------------------------------- CLI


def _cmd_longctx(args) -> int:
    from tqdm import tqdm

    from herd.tokenizer import load_tokenizer

    tasks, lengths = parse_tasks(args.tasks), parse_lengths(args.lengths)
    depths = parse_depths(args.depths) if args.depths else None
    tok = load_tokenizer(args.tokenizer)
    rows = []
    bar = tqdm(total=len(tasks) * len(lengths) * args.samples, desc="longctx", unit="sample")
    for task in tasks:
        for length in lengths:
            for s in generate_samples(tok, task, length, args.samples, seed=args.seed, depths=depths,
                                      haystack=args.haystack):
                rows.append(s)
                bar.update()
    bar.close()
    path = write_jsonl_atomic(rows, args.out)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    print(f"wrote {len(rows)} samples to {path} (sha256 {digest}, tokenizer {tok.name})")
    return 0


def add_longctx_parser(sub) -> argparse.ArgumentParser:
    """`herd data longctx`: write RULER-style samples as JSONL."""
    p = sub.add_parser("longctx", help="synthetic long-context tasks (RULER families + file/multi-hop) as JSONL",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default="llama4", help="'llama4' or a model/tokenizer directory (lengths are exact for it)")
    p.add_argument("--tasks", default="all", help=f"comma-separated: {', '.join(TASKS)}, 'niah' or 'all'")
    p.add_argument("--lengths", default="4k", help="comma-separated token lengths incl. generation, e.g. 1k,4k,16k")
    p.add_argument("--samples", type=int, default=10, help="samples per task and length")
    p.add_argument("--depths", default=None, help="needle depths in %% (e.g. 0,25,50,75,100; default: RULER's 40)")
    p.add_argument("--haystack", default=None, help=f"prose haystack for prose tasks: {', '.join(PROSE_SOURCES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .jsonl path (written atomically)")
    p.set_defaults(func=_cmd_longctx)
    return p
