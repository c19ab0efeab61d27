"""Tokenizer throughput and compression: herd's official and trained tokenizers vs llama-models.

    .venv/bin/python benchmarks/tokenizer_speed.py [--vocab-size 8192] [--repeat 3]

Trains a byte-level BPE (default 8k) on the default offline corpus (CPython stdlib + pydoc
topics, train split), then on the held-out split measures:
  * encode speed (MB/s of UTF-8 input) of herd's official Llama 4 tokenizer (one long
    string, and encode_batch over the documents), of the trained tokenizer (herd runs its
    tokenizer.json through tiktoken; the `tokenizers` library gives the same ids, shown
    too), and of the named peer: llama-models' own Tokenizer.encode (tiktoken through
    llama-models);
  * compression (bytes/token) of both tokenizers on held-out code and held-out prose.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from herd.tokenizer import load_tokenizer  # noqa: E402
from herd.tokenizer_train import bytes_per_token, default_corpus, train_tokenizer  # noqa: E402


def best_seconds(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    train_docs = default_corpus("train")
    code, prose = default_corpus("heldout", "code"), default_corpus("heldout", "prose")
    heldout = code + prose
    text = "".join(heldout)
    mb = len(text.encode("utf-8")) / 1e6

    official = load_tokenizer("llama4")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trained = train_tokenizer(train_docs, args.vocab_size, tmp)
        train_s = time.perf_counter() - t0
        trained_hf = load_tokenizer(tmp, backend="tokenizers")  # same ids, `tokenizers` library
    train_mb = sum(len(d.encode("utf-8")) for d in train_docs) / 1e6

    from llama_models.llama4.tokenizer import Tokenizer as PeerTokenizer

    peer = PeerTokenizer.get_instance()
    assert official.encode(text) == peer.encode(text, bos=False, eos=False)  # same work, same output
    assert trained.encode(text) == trained_hf.encode(text)

    rows = [
        ("llama-models Tokenizer.encode (peer)", lambda: peer.encode(text, bos=False, eos=False)),
        ("herd official encode", lambda: official.encode(text)),
        ("herd official encode_batch", lambda: official.encode_batch(heldout)),
        (f"herd trained {args.vocab_size // 1024}k encode", lambda: trained.encode(text)),
        (f"herd trained {args.vocab_size // 1024}k encode_batch", lambda: trained.encode_batch(heldout)),
        (f"herd trained {args.vocab_size // 1024}k, tokenizers backend, encode", lambda: trained_hf.encode(text)),
        (f"herd trained {args.vocab_size // 1024}k, tokenizers backend, encode_batch",
         lambda: trained_hf.encode_batch(heldout)),
    ]
    speeds = {name: mb / best_seconds(fn, args.repeat) for name, fn in rows}
    peer_speed = speeds[rows[0][0]]

    print(f"held-out text: {mb:.2f} MB ({len(code)} code docs, {len(prose)} prose docs); "
          f"{os.cpu_count()} CPUs; best of {args.repeat}")
    print(f"trained {args.vocab_size}-token BPE on {train_mb:.1f} MB in {train_s:.1f} s\n")
    print("| tokenizer | encode MB/s | vs peer |")
    print("|---|---:|---:|")
    for name, speed in speeds.items():
        print(f"| {name} | {speed:.2f} | {speed / peer_speed:.2f}x |")
    print()
    print("| tokenizer | vocab | bytes/token, held-out code | bytes/token, held-out prose |")
    print("|---|---:|---:|---:|")
    for name, tok in (("official Llama 4", official), (f"trained {args.vocab_size // 1024}k", trained)):
        print(f"| {name} | {tok.vocab_size} | {bytes_per_token(tok, code):.3f} | {bytes_per_token(tok, prose):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
