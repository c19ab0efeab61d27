"""Llama 4 tokenizers: the official tiktoken BPE and byte-level BPEs trained with `tokenizers`.

    tok = load_tokenizer("llama4")          # Meta's tokenizer.model shipped in llama_models
    tok = load_tokenizer("path/to/dir")     # a checkpoint dir: tokenizer.json or tokenizer.model
    ids = tok.encode("Hello", bos=True)     # list[int]
    tok.decode(ids)                         # "<|begin_of_text|>Hello"

Every tokenizer has the same small interface (`Tokenizer`), whatever backend runs it:
encode / encode_batch / decode, `special_tokens` (name -> id), `vocab_size`, and the ids that
the chat format and generation need (bos_id, eos_id, eot_id, eom_id, pad_id, patch_id,
stop_tokens).

Special-token text typed by a user (say "<|eot|>") is encoded as plain text unless the caller
passes allow_special=True, so user input can never inject control tokens.

Very long inputs are cut the way Meta's reference does (400k-character chunks, then runs of
more than 25k whitespace / non-whitespace characters), so results are identical to Meta's and
tiktoken's regex never sees pathological input.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

# The pre-tokenizer regex of Llama 4 (OpenAI's o200k pattern), as in Meta's reference.
O200K_PATTERN = (
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
    r"""|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
    r"""|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

MAX_ENCODE_CHARS = 400_000  # tiktoken handles at most this many characters per call
MAX_RUN_CHARS = 25_000  # longest run of (non-)whitespace characters handed to the BPE

NUM_SPECIAL_SLOTS = 2048  # official tokenizer: special ids [n_base, n_base + 2048)
NUM_TRAINED_SPECIALS = 128  # trained tokenizers: the first 128 official specials, at the top


def _numbered(prefix: str, start: int, count: int) -> list[str]:
    return [f"<|{prefix}_{i}|>" for i in range(start, start + count)]


def llama4_special_token_names() -> list[str]:
    """The 2048 official special-token strings; the k-th one has id 200000 + k."""
    text_rsv = "text_post_train_reserved_special_token"
    vision_rsv = "vision_reserved_special_token"
    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    text = [
        "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>",
        *_numbered(text_rsv, 0, 6),
        "<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>",
        *_numbered(text_rsv, 8, 61),
    ]  # 200005 .. 200079
    vision = [
        "<|image_start|>", "<|image_end|>", *_numbered(vision_rsv, 0, 2),
        "<|tile_x_separator|>", "<|tile_y_separator|>", *_numbered(vision_rsv, 2, 4),
        "<|image|>", *_numbered(vision_rsv, 6, 1), "<|patch|>",
        *_numbered(vision_rsv, 7, 1041),
    ]  # 200080 .. 201133
    reasoning = [
        *_numbered("reasoning_reserved_special_token", 0, 8),
        "<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>",
    ]  # 201134 .. 201143
    names = basic + text + vision + reasoning
    names += _numbered("reserved_special_token", 0, NUM_SPECIAL_SLOTS - len(names))
    assert len(names) == len(set(names)) == NUM_SPECIAL_SLOTS
    return names


# ----------------------------------------------------------------------------- long inputs

@functools.lru_cache(maxsize=1)
def _whitespace_table():
    """Boolean lookup: code point -> str.isspace(); every whitespace code point is <= U+3000."""
    import numpy as np

    return np.array([chr(c).isspace() for c in range(0x3001)] + [False], dtype=bool)


def _long_runs(chunk: str) -> list[tuple[int, int]]:
    """(start, end) of every run of whitespace / non-whitespace longer than MAX_RUN_CHARS."""
    import numpy as np

    codes = np.frombuffer(chunk.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)  # [n]
    is_space = _whitespace_table()[np.minimum(codes, 0x3001)]  # [n] bool
    change = np.flatnonzero(is_space[1:] != is_space[:-1]) + 1  # first index of each new run
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [len(chunk)]))
    long = np.flatnonzero(ends - starts > MAX_RUN_CHARS)
    return [(int(starts[i]), int(ends[i])) for i in long]


def split_long_text(text: str) -> Iterator[str]:
    """Cut `text` into pieces the BPE handles safely, exactly where Meta's reference cuts.

    First into MAX_ENCODE_CHARS-character chunks; inside each chunk, a run of whitespace or
    of non-whitespace characters longer than MAX_RUN_CHARS is cut every MAX_RUN_CHARS
    characters from the start of the run. Concatenating the pieces gives back `text`.
    """
    if not text:
        yield text
        return
    for base in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[base : base + MAX_ENCODE_CHARS]
        if len(chunk) <= MAX_RUN_CHARS:
            yield chunk
            continue
        start = 0
        for run_start, run_end in _long_runs(chunk):
            for cut in range(run_start + MAX_RUN_CHARS, run_end, MAX_RUN_CHARS):
                yield chunk[start:cut]
                start = cut
        yield chunk[start:]


# ----------------------------------------------------------------------------- backends


class _TiktokenBackend:
    """tiktoken BPE: the official tokenizer.model, and compatible tokenizer.json files."""

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int], name: str):
        import tiktoken

        self.encoding = tiktoken.Encoding(
            name=name, pat_str=O200K_PATTERN, mergeable_ranks=ranks, special_tokens=special_tokens
        )
        self.vocab_size = self.encoding.n_vocab

    def encode_pieces(self, pieces: Sequence[str], allow_special: bool) -> list[list[int]]:
        if allow_special:
            allowed = self.encoding.special_tokens_set
            return [self.encoding.encode(p, allowed_special=allowed, disallowed_special=()) for p in pieces]
        return [self.encoding.encode_ordinary(p) for p in pieces]

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.encoding.decode_bytes(ids)


class _HFBackend:
    """A `tokenizers` tokenizer.json (trained tokenizers, Hugging Face checkpoints)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.plain = HFTokenizer.from_file(str(path))  # special-token text stays text
        self.plain.encode_special_tokens = True
        self.special = HFTokenizer.from_file(str(path))  # special-token text becomes specials
        self.special.encode_special_tokens = False
        self.vocab_size = self.plain.get_vocab_size(with_added_tokens=True)

    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self.plain.get_added_tokens_decoder().items() if t.special}

    def encode_pieces(self, pieces: Sequence[str], allow_special: bool) -> list[list[int]]:
        tok = self.special if allow_special else self.plain
        batch = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets
        try:
            return [e.ids for e in batch(list(pieces), add_special_tokens=False)]
        except (TypeError, UnicodeEncodeError):  # lone surrogates: replace them, as tiktoken does
            fixed = [p.encode("utf-16", "surrogatepass").decode("utf-16", "replace") for p in pieces]
            return [e.ids for e in batch(fixed, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.plain.decode(ids, skip_special_tokens=False)

    def decode_bytes(self, ids: list[int]) -> bytes:
        to_byte = {c: b for b, c in byte_level_alphabet().items()}
        added = self.plain.get_added_tokens_decoder()
        out = bytearray()
        for i in ids:
            token = self.plain.id_to_token(i)
            if i not in added and token is not None and all(c in to_byte for c in token):
                out += bytes(to_byte[c] for c in token)  # byte-level token: its raw bytes
            else:
                out += self.plain.decode([i], skip_special_tokens=False).encode("utf-8")
        return bytes(out)


# ----------------------------------------------------------------------------- interface


class Tokenizer:
    """One interface over both backends. Build it with `load_tokenizer`."""

    def __init__(self, backend, special_tokens: dict[str, int], name: str = "", source: Path | None = None):
        self._backend = backend
        self.name = name
        self.source = source  # the file it was loaded from (tokenizer.json / tokenizer.model)
        self.backend = "tiktoken" if isinstance(backend, _TiktokenBackend) else "tokenizers"
        self.special_tokens: dict[str, int] = dict(special_tokens)
        self.vocab_size: int = backend.vocab_size
        get = self.special_tokens.get
        self.bos_id: int | None = get("<|begin_of_text|>")
        self.eos_id: int | None = get("<|end_of_text|>")
        self.eot_id: int | None = get("<|eot|>")
        self.eom_id: int | None = get("<|eom|>")
        self.pad_id: int | None = get("<|finetune_right_pad|>")
        self.patch_id: int | None = get("<|patch|>")
        self.image_token_index = self.patch_id  # the HF name for the same id
        # Generation stops on any of these (Meta's order: end_of_text, eom, eot).
        self.stop_tokens: list[int] = [i for i in (self.eos_id, self.eom_id, self.eot_id) if i is not None]
        self.eos_ids = list(self.stop_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, specials={len(self.special_tokens)})"

    def __len__(self) -> int:
        return self.vocab_size

    def token_id(self, name: str) -> int:
        """Id of a special token by its string, e.g. token_id('<|eot|>'); ValueError if absent."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise ValueError(f"tokenizer {self.name!r} has no special token {name!r}") from None

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it stay plain text unless allow_special."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        pieces = list(split_long_text(text))
        ids: list[int] = []
        for part in self._backend.encode_pieces(pieces, allow_special):
            ids.extend(part)
        return self._wrap(ids, bos, eos)

    def encode_batch(
        self, texts: Iterable[str], bos: bool = False, eos: bool = False, allow_special: bool = False
    ) -> list[list[int]]:
        """encode() for many texts at once (one call into the backend)."""
        texts = list(texts)
        pieces: list[str] = []
        owner: list[int] = []  # pieces[j] belongs to texts[owner[j]]
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"encode_batch expects str items, item {i} is {type(text).__name__}")
            for piece in split_long_text(text):
                pieces.append(piece)
                owner.append(i)
        encoded = self._backend.encode_pieces(pieces, allow_special)
        out: list[list[int]] = [[] for _ in texts]
        for i, part in zip(owner, encoded):
            out[i].extend(part)
        return [self._wrap(ids, bos, eos) for ids in out]

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            ids.insert(0, self._required(self.bos_id, "<|begin_of_text|>"))
        if eos:
            ids.append(self._required(self.eos_id, "<|end_of_text|>"))
        return ids

    def _required(self, value: int | None, name: str) -> int:
        if value is None:
            raise ValueError(f"tokenizer {self.name!r} has no {name} token")
        return value

    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]  # accepts lists, tuples, numpy arrays, 1-D tensors
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; special tokens appear as their strings, bad UTF-8 as U+FFFD."""
        return self._backend.decode(self._check_ids(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes of token ids (useful when streaming partial UTF-8)."""
        return self._backend.decode_bytes(self._check_ids(ids))

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write this tokenizer into a checkpoint directory (tokenizer.json or tokenizer.model)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        src = self.source
        if src is None:
            raise ValueError(f"tokenizer {self.name!r} has no source file to save")
        is_json = src.suffix == ".json"
        data = src.read_bytes()
        (out / ("tokenizer.json" if is_json else "tokenizer.model")).write_bytes(data)
        if is_json:  # keep the checkpoint's own HF configs (chat template ...) when it has them
            configs = ("tokenizer_config.json", "special_tokens_map.json")
            if all((src.parent / c).is_file() for c in configs):
                for c in configs:
                    (out / c).write_bytes((src.parent / c).read_bytes())
            else:
                write_hf_configs(out, self.special_tokens)
        return out


def write_hf_configs(out_dir: Path, special_tokens: dict[str, int], model_max_length: int = 1 << 20) -> None:
    """tokenizer_config.json and special_tokens_map.json, as Hugging Face checkpoints ship them."""
    names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot|>", "pad_token": "<|finetune_right_pad|>"}
    names = {k: v for k, v in names.items() if v in special_tokens}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        **names,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(names, indent=2) + "\n")


# ----------------------------------------------------------------------------- loading


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one `base64(token) rank` pair per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:80]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be the integers 0..{len(ranks) - 1} with no gaps")
    return ranks


def official_tokenizer_path() -> Path:
    """Path of the Llama 4 tokenizer.model that the llama-models package ships."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the official Llama 4 tokenizer needs the 'llama-models' package: pip install llama-models")
    path = Path(list(spec.submodule_search_locations)[0]) / "llama4" / "tokenizer.model"
    if not path.is_file():
        raise ValueError(f"llama-models is installed but {path} is missing")
    return path


def _from_tiktoken_file(path: Path) -> Tokenizer:
    ranks = read_tiktoken_ranks(path)
    n_base = len(ranks)
    specials = {name: n_base + k for k, name in enumerate(llama4_special_token_names())}
    return Tokenizer(_TiktokenBackend(ranks, specials, path.name), specials, name=str(path), source=path)


@functools.lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _tiktoken_ranks(data: dict) -> dict[bytes, int] | None:
    """Ranks for tiktoken if tokenizer.json is a byte-level BPE that tiktoken runs identically
    (o200k split + byte-level, ranks = ids in merge order, plain special tokens); else None."""
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") or []
    if (
        model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback")
        or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
        or data.get("normalizer") is not None or (data.get("decoder") or {}).get("type") != "ByteLevel"
        or pre.get("type") != "Sequence" or len(steps) != 2
        or steps[0].get("type") != "Split" or steps[0].get("pattern") != {"Regex": O200K_PATTERN}
        or steps[0].get("behavior") != "Isolated" or steps[0].get("invert")
        or steps[1].get("type") != "ByteLevel" or steps[1].get("use_regex") or steps[1].get("add_prefix_space")
    ):
        return None
    if any(not t.get("special") or t.get("lstrip") or t.get("rstrip") for t in data.get("added_tokens", [])):
        return None
    to_byte = {c: b for b, c in byte_level_alphabet().items()}
    vocab: dict[str, int] = model["vocab"]
    try:
        ranks = {bytes(to_byte[c] for c in token): i for token, i in vocab.items()}
    except KeyError:
        return None
    merged = [vocab.get(m.replace(" ", "", 1) if isinstance(m, str) else "".join(m)) for m in model.get("merges", [])]
    if len(ranks) != len(vocab) or None in merged or any(a >= b for a, b in zip(merged, merged[1:])):
        return None  # merge order must equal id order for tiktoken's rank-based merging
    return ranks


def _from_tokenizer_json(path: Path, backend: str = "auto") -> Tokenizer:
    """tokenizer.json: run by tiktoken when that gives identical ids (much faster), else by
    the `tokenizers` library (backend="tokenizers" forces it)."""
    if backend not in ("auto", "tokenizers", "tiktoken"):
        raise ValueError(f"backend must be 'auto', 'tokenizers' or 'tiktoken', got {backend!r}")
    if backend != "tokenizers":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable tokenizer.json: {e}") from None
        ranks = _tiktoken_ranks(data)
        if ranks is not None:
            specials = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
            return Tokenizer(_TiktokenBackend(ranks, specials, path.name), specials, name=str(path), source=path)
        if backend == "tiktoken":
            raise ValueError(f"{path} is not a byte-level BPE that tiktoken can run identically")
    hf = _HFBackend(path)
    return Tokenizer(hf, hf.special_tokens(), name=str(path), source=path)


@functools.lru_cache(maxsize=1)
def _official() -> Tokenizer:
    tok = _from_tiktoken_file(official_tokenizer_path())
    tok.name = "llama4"
    return tok


def load_tokenizer(name_or_path: str | os.PathLike = "llama4", backend: str = "auto") -> Tokenizer:
    """Load a tokenizer.

    "llama4": the official Llama 4 tokenizer (vocab 202048; cached, so cheap to call again).
    A directory: its tokenizer.json (preferred) or tokenizer.model.
    A file: tokenizer.json-style JSON or a tiktoken BPE file.
    backend (tokenizer.json only): "auto" runs a byte-level BPE with the o200k split through
    tiktoken (same ids, several times faster) and anything else through `tokenizers`;
    "tokenizers" forces the `tokenizers` library.
    """
    if isinstance(name_or_path, Tokenizer):
        return name_or_path
    if str(name_or_path) in ("llama4", "official"):
        return _official()
    path = Path(name_or_path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _from_tokenizer_json(path / "tokenizer.json", backend)
        if (path / "tokenizer.model").is_file():
            return _from_tiktoken_file(path / "tokenizer.model")
        raise ValueError(f"{path} has neither tokenizer.json nor tokenizer.model")
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(1).strip() or b""
        if path.suffix == ".json" or head == b"{":
            return _from_tokenizer_json(path, backend)
        return _from_tiktoken_file(path)
    raise ValueError(f"unknown tokenizer {str(name_or_path)!r}: expected 'llama4', a directory or a tokenizer file")
