"""Train small Llama-4-style tokenizers: byte-level BPE with the o200k pre-tokenizer.

    tok = train_tokenizer(["corpus.txt", "more/"], vocab_size=8192, out_dir="tok8k")
    herd tokenizer train --vocab-size 8192 --out tok8k corpus.txt more/

Layout of a trained tokenizer with total vocab N (the model presets rely on it):
ids [0, N-128) are ordinary BPE tokens (the 256 byte tokens first), ids [N-128, N) are the
first 128 official Llama 4 special tokens in their official order, so the special with id
N-128+k is the official token with id 200000+k (<|begin_of_text|> = N-128,
<|eot|> = N-120, <|image_start|> = N-48, <|patch|> = N-36).

The result is a Hugging Face `tokenizer.json` (+ tokenizer_config.json and
special_tokens_map.json), loadable by herd.load_tokenizer(dir) and by
transformers.PreTrainedTokenizerFast(tokenizer_file=...).

Without corpora, training uses text that is on every machine: the CPython standard library's
.py files and pydoc's topic help (`default_corpus`), 90 % for training, 10 % held out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Iterable, Iterator

from herd.tokenizer import (
    NUM_TRAINED_SPECIALS,
    O200K_PATTERN,
    Tokenizer,
    llama4_special_token_names,
    load_tokenizer,
    split_long_text,
    write_hf_configs,
)

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv", ".tsv", ".html", ".xml", ".c", ".h", ".yaml", ".yml", ".toml"}
MIN_VOCAB = 256 + NUM_TRAINED_SPECIALS  # every byte + the specials
HELDOUT_EVERY = 10  # default corpus: every 10th document is held out


def trained_special_token_names() -> list[str]:
    """The 128 specials of a trained tokenizer: official ids 200000..200127, in order."""
    return llama4_special_token_names()[:NUM_TRAINED_SPECIALS]


# ----------------------------------------------------------------------------- corpora


def default_corpus(split: str = "train", kind: str = "all") -> list[str]:
    """Offline text: CPython stdlib sources (no tests) and pydoc topic help, as documents.

    split="train" gives 9 of every 10 documents of each kind, split="heldout" the 10th
    (deterministic). kind: "code" (stdlib .py files), "prose" (pydoc topics) or "all".
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if kind not in ("all", "code", "prose"):
        raise ValueError(f"kind must be 'all', 'code' or 'prose', got {kind!r}")
    docs: list[str] = []
    if kind in ("all", "code"):
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
        files = sorted(p for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts))
        texts = (p.read_text(encoding="utf-8", errors="replace") for p in files)
        docs += _split([t for t in texts if t.strip()], split)  # empty __init__.py files are no text
    if kind in ("all", "prose"):
        try:
            from pydoc_data.topics import topics
        except ImportError:  # pragma: no cover - some distributions strip pydoc_data
            topics = {}
        docs += _split([topics[k] for k in sorted(topics)], split)
    return docs


def _split(docs: list[str], split: str) -> list[str]:
    heldout = split == "heldout"
    return [d for i, d in enumerate(docs) if (i % HELDOUT_EVERY == 0) == heldout]


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)


def iter_corpus(texts_or_files: Iterable | None) -> Iterator[str]:
    """Documents from a mix of strings (text), Paths / existing file or directory paths."""
    if texts_or_files is None:
        yield from default_corpus("train")
        return
    if isinstance(texts_or_files, (str, os.PathLike)):
        texts_or_files = [texts_or_files]
    for item in texts_or_files:
        path = None
        if isinstance(item, os.PathLike):
            path = Path(item)
            if not path.exists():
                raise ValueError(f"corpus file not found: {path}")
        elif isinstance(item, str):
            if "\n" not in item and len(item) < 4096 and os.path.exists(item):
                path = Path(item)
        else:
            raise ValueError(f"corpus items must be str texts or paths, got {type(item).__name__}")
        if path is None:
            yield item
        elif path.is_dir():
            files = _files_under(path)
            if not files:
                raise ValueError(f"corpus directory {path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
            for f in files:
                yield f.read_text(encoding="utf-8", errors="replace")
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


# ----------------------------------------------------------------------------- training


def _build_empty_tokenizer():
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    # ignore_merges: a pre-token that is itself in the vocab maps straight to it, as in tiktoken.
    tok = HFTokenizer(models.BPE(byte_fallback=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _pad_vocab(tokenizer_json: dict, n_ordinary: int) -> None:
    """Fill the BPE vocab up to n_ordinary ids with tokens no merge can produce (small corpora)."""
    vocab: dict[str, int] = tokenizer_json["model"]["vocab"]
    k = 0
    while len(vocab) < n_ordinary:
        # "ÿ" is byte 0xFF in the byte-level alphabet, which UTF-8 text never contains: unreachable.
        name = f"ÿ<unused_{k}>"
        if name not in vocab:
            vocab[name] = len(vocab)
        k += 1


def train_tokenizer(
    texts_or_files: Iterable | None,
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    min_frequency: int = 2,
    max_token_chars: int | None = 32,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE of total vocab `vocab_size` and save it into `out_dir`.

    texts_or_files: strings of text, paths of files or directories (their text files), or
    None for `default_corpus("train")`. Returns the loaded tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, pre_tokenizers, processors, trainers

    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be an int >= {MIN_VOCAB} (256 bytes + 128 specials), got {vocab_size!r}")
    n_ordinary = vocab_size - NUM_TRAINED_SPECIALS
    trainer = trainers.BpeTrainer(
        vocab_size=n_ordinary,
        min_frequency=min_frequency,
        show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        max_token_length=max_token_chars,
    )
    n_docs = 0

    def pieces() -> Iterator[str]:
        nonlocal n_docs
        for doc in iter_corpus(texts_or_files):
            n_docs += 1
            yield from split_long_text(doc)

    tok = _build_empty_tokenizer()
    tok.train_from_iterator(pieces(), trainer=trainer)
    if n_docs == 0:
        raise ValueError("the training corpus is empty")

    # Exactly n_ordinary ordinary ids, then the 128 specials on top.
    data = json.loads(tok.to_str())
    _pad_vocab(data, n_ordinary)
    tok = HFTokenizer.from_str(json.dumps(data))
    specials = trained_special_token_names()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    got = {s: tok.token_to_id(s) for s in specials}
    assert got == {s: n_ordinary + k for k, s in enumerate(specials)}, "special ids out of place"
    bos = specials[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A:0", pair=f"{bos} $A:0 {bos}:1 $B:1", special_tokens=[(bos, n_ordinary)]
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    write_hf_configs(out, {s: n_ordinary + k for k, s in enumerate(specials)})
    return load_tokenizer(out)


def bytes_per_token(tokenizer: Tokenizer, docs: Iterable[str]) -> float:
    """Compression on `docs`: UTF-8 bytes per token (higher is better)."""
    docs = list(docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(docs))
    return n_bytes / max(n_tokens, 1)


# ----------------------------------------------------------------------------- CLI


def _cmd_train(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    corpora = args.corpora or None
    try:
        tok = train_tokenizer(corpora, args.vocab_size, args.out, min_frequency=args.min_frequency,
                              show_progress=args.progress)
    except ValueError as e:
        print(f"herd tokenizer train: error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    print(f"trained {tok.vocab_size}-token tokenizer in {seconds:.1f}s -> {Path(args.out) / 'tokenizer.json'}")
    if corpora is None:
        print(f"held-out bytes/token: {bytes_per_token(tok, default_corpus('heldout')):.3f}")
    return 0


def add_tokenizer_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `tokenizer train` on an argparse subparsers object; returns the `tokenizer` parser."""
    parser = subparsers.add_parser("tokenizer", help="tokenizer tools (train a byte-level BPE)")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="{train}")
    sub.required = True
    train = sub.add_parser("train", help="train a byte-level BPE with the Llama 4 special tokens")
    train.add_argument("corpora", nargs="*", help="text files or directories (default: Python stdlib + pydoc topics)")
    train.add_argument("--vocab-size", type=int, required=True, help=f"total vocab incl. 128 specials (>= {MIN_VOCAB})")
    train.add_argument("--out", required=True, help="output directory (tokenizer.json + HF configs)")
    train.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    train.add_argument("--progress", action="store_true", help="show the trainer's progress bar")
    train.set_defaults(func=_cmd_train)
    return parser


def tokenizer_cli(argv: list[str] | None = None) -> int:
    """`herd tokenizer ARGS...` as a function: tokenizer_cli(["train", "--vocab-size", "8192", ...])."""
    parser = argparse.ArgumentParser(prog="herd")
    add_tokenizer_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tokenizer", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(tokenizer_cli())
