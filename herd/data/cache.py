"""The tokenised cache on disk: token ids of every document, and digit tiles, built once.

    corpus = text_corpus(tokenizer, "bible", cache_dir)        # TextCorpus (memory-mapped)
    digits = digit_corpus(vision_config, cache_dir)             # DigitCorpus

Layout (one directory per entry, never modified once written):

    CACHE/text/SOURCE/KEY/   tokens.npy   uint16 (vocab <= 65536) or uint32, all documents' ids
                             offsets.npy  int64 [n_docs + 1]: document i is tokens[o[i]:o[i+1]]
                             nbytes.npy   int64 [n_docs]: UTF-8 bytes of each document
                             docs.json    doc ids and split keys;  meta.json  what it was built from
    CACHE/digits/KEY/        tiles.npy    uint8 [N, n_tiles, S, S];  labels.npy;  docs.json;  meta.json

KEY hashes the source version (package and Python versions, loader version), the tokenizer's
fingerprint (its file, vocabulary size, special tokens and the ids of a probe text) and the
document limit, so changing any of them builds a new entry and never reuses a stale one.
Entries are written into a temporary directory and renamed into place (atomic on POSIX):
a crash leaves no half-written entry, and concurrent builders (several ranks) are safe.
Documents are stored without BOS/EOS; packing adds them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from herd.data.sources import load_documents, source_version

CACHE_FORMAT = 1
PROBE_TEXT = "Hello, world! def f(x):\n    return x ** 2  # 12345 ÆØÅ 漢字 🙂\n\n<|eot|>"
ENCODE_CHUNK_BYTES = 4_000_000  # documents handed to encode_batch at once


def default_cache_dir() -> Path:
    """$HERD_DATA_CACHE, else ~/.cache/herd/data."""
    env = os.environ.get("HERD_DATA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "herd" / "data"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash that changes whenever the tokenizer could encode text differently."""
    h = hashlib.sha256()
    h.update(f"vocab={tokenizer.vocab_size}\n".encode())
    h.update(json.dumps(sorted(tokenizer.special_tokens.items())).encode())
    src = getattr(tokenizer, "source", None)
    if src is not None and Path(src).is_file():
        h.update(Path(src).read_bytes())
    h.update(json.dumps(tokenizer.encode(PROBE_TEXT)).encode())
    return h.hexdigest()[:24]


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps([CACHE_FORMAT, *parts]).encode()).hexdigest()[:20]


def _publish(tmp: Path, final: Path) -> bool:
    """Move a finished temporary entry into place; False if another builder got there first."""
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        if (final / "meta.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise


def _tmpdir(parent: Path, key: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=parent))


# ----------------------------------------------------------------------------- text


@dataclass
class TextCorpus:
    """One source's documents as token ids (memory-mapped from the cache)."""

    name: str
    tokens: np.ndarray  # [n_tokens] uint16 / uint32
    offsets: np.ndarray  # [n_docs + 1] int64
    nbytes: np.ndarray  # [n_docs] int64
    doc_ids: list[str]
    split_keys: list[str]
    path: Path
    built: bool = False  # True when this call tokenised the source (a cache miss)
    seconds: float = 0.0

    @property
    def n_docs(self) -> int:
        return len(self.doc_ids)

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def _load_text(path: Path, name: str, built: bool, seconds: float) -> TextCorpus:
    docs = json.loads((path / "docs.json").read_text())
    return TextCorpus(
        name=name,
        tokens=np.load(path / "tokens.npy", mmap_mode="r"),
        offsets=np.load(path / "offsets.npy"),
        nbytes=np.load(path / "nbytes.npy"),
        doc_ids=docs["doc_ids"],
        split_keys=docs["split_keys"],
        path=path,
        built=built,
        seconds=seconds,
    )


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    batch = getattr(tokenizer, "encode_batch", None)
    return batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]


def text_corpus(tokenizer, name: str, cache_dir=None, limit: int | None = None,
                progress: bool | None = None) -> TextCorpus:
    """Source `name` tokenised with `tokenizer`, from the cache (built on a miss).

    limit: only the source's first `limit` documents (tests, quick runs).
    progress: tqdm bar while tokenising (None: only on a terminal)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    version = source_version(name)
    fingerprint = tokenizer_fingerprint(tokenizer)
    key = _key("text", version, fingerprint, limit)
    parent = cache_dir / "text" / name
    final = parent / key
    if (final / "meta.json").is_file():
        return _load_text(final, name, built=False, seconds=0.0)

    t0 = time.perf_counter()
    docs = load_documents(name, limit=limit)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    lengths = np.zeros(len(docs), dtype=np.int64)
    nbytes = np.array([len(d.text.encode("utf-8")) for d in docs], dtype=np.int64)
    tmp = _tmpdir(parent, key)
    try:
        from tqdm import tqdm

        chunks: list[np.ndarray] = []
        with tqdm(total=int(nbytes.sum()), unit="B", unit_scale=True, desc=f"tokenising {name}",
                  disable=None if progress is None else not progress, leave=False) as bar:
            start = 0
            while start < len(docs):
                end, size = start, 0
                while end < len(docs) and (end == start or size + nbytes[end] <= ENCODE_CHUNK_BYTES):
                    size += nbytes[end]
                    end += 1
                for i, ids in enumerate(_encode_many(tokenizer, [d.text for d in docs[start:end]]), start):
                    lengths[i] = len(ids)
                    chunks.append(np.asarray(ids, dtype=dtype))
                bar.update(int(size))
                start = end
        tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        np.save(tmp / "tokens.npy", tokens)
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "nbytes.npy", nbytes)
        (tmp / "docs.json").write_text(json.dumps({"doc_ids": [d.doc_id for d in docs],
                                                   "split_keys": [d.key for d in docs]}))
        seconds = time.perf_counter() - t0
        meta = {"source": name, "source_version": version, "tokenizer": fingerprint,
                "vocab_size": tokenizer.vocab_size, "limit": limit, "n_docs": len(docs),
                "n_tokens": int(offsets[-1]), "n_bytes": int(nbytes.sum()), "seconds": round(seconds, 2)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _load_text(final, name, built=True, seconds=seconds)


# ----------------------------------------------------------------------------- digits


@dataclass
class DigitCorpus:
    """Digit images tiled for one vision config."""

    tiles: np.ndarray  # [N, n_tiles, S, S] uint8
    labels: np.ndarray  # [N] int64
    doc_ids: list[str]
    grid: tuple[int, int]
    path: Path
    built: bool = False
    name: str = "digits"
    split_keys: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.split_keys:
            self.split_keys = list(self.doc_ids)

    @property
    def n_docs(self) -> int:
        return len(self.doc_ids)

    @property
    def tiles_per_image(self) -> int:
        return int(self.tiles.shape[1])


def digit_corpus(vision_config, cache_dir=None, limit: int | None = None, which=None) -> DigitCorpus:
    """All digit images tiled for `vision_config`, from the cache (built on a miss)."""
    from herd.data.images import DIGIT_SOURCES, digit_tiles, digits_version, load_digits
    from herd.image import VisionSettings

    which = tuple(which or DIGIT_SOURCES)
    settings = VisionSettings.from_config(vision_config)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _key("digits", digits_version(which), settings.tile_size, settings.patch_size,
               settings.pixel_shuffle_ratio, settings.max_num_tiles, limit, list(which))
    parent = cache_dir / "digits"
    final = parent / key
    built = False
    if not (final / "meta.json").is_file():
        images, labels, ids = load_digits(which, limit=limit)
        tiles, grid = digit_tiles(images, settings)
        tmp = _tmpdir(parent, key)
        try:
            np.save(tmp / "tiles.npy", tiles)
            np.save(tmp / "labels.npy", labels)
            (tmp / "docs.json").write_text(json.dumps({"doc_ids": ids}))
            (tmp / "meta.json").write_text(json.dumps({"grid": list(grid), "n": len(ids), "which": list(which),
                                                       "tile_size": settings.tile_size}))
            built = _publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    meta = json.loads((final / "meta.json").read_text())
    return DigitCorpus(
        tiles=np.load(final / "tiles.npy", mmap_mode="r"),
        labels=np.load(final / "labels.npy"),
        doc_ids=json.loads((final / "docs.json").read_text())["doc_ids"],
        grid=tuple(meta["grid"]),
        path=final,
        built=built,
    )
