"""herd.tokenizer: parity with llama-models' Llama 4 tokenizer, and trained tokenizers.

The official tokenizer is pure tiktoken, so llama-models' Tokenizer runs right here as the
reference (no oracle venv needed).
"""

import json
import random
import shutil
import sysconfig
import time
from pathlib import Path

import pytest

from herd.tokenizer import (
    MAX_ENCODE_CHARS,
    MAX_RUN_CHARS,
    load_tokenizer,
    official_tokenizer_path,
    split_long_text,
)
from herd.tokenizer_train import (
    add_tokenizer_subcommand,
    bytes_per_token,
    default_corpus,
    tokenizer_cli,
    train_tokenizer,
    trained_special_token_names,
)

meta_tokenizer = pytest.importorskip("llama_models.llama4.tokenizer")  # a dev dependency


@pytest.fixture(scope="module")
def official():
    return load_tokenizer("llama4")


@pytest.fixture(scope="module")
def meta():
    return meta_tokenizer.Tokenizer.get_instance()


# ----------------------------------------------------------------------------- test text


def _cjk(rng: random.Random, n: int) -> str:
    ranges = [(0x4E00, 0x9FFF), (0x3040, 0x309F), (0x30A0, 0x30FF), (0xAC00, 0xD7A3)]
    punct = "。、「」！？・ー（）"
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.08:
            out.append(rng.choice(punct))
        elif r < 0.10:
            out.append(rng.choice(" \n"))
        elif r < 0.12:
            out.append(str(rng.randint(0, 999)))
        else:
            lo, hi = rng.choice(ranges)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def _emoji(rng: random.Random, n: int) -> str:
    pieces = ["😀", "🚀", "👍🏽", "👨‍👩‍👧‍👦", "🇯🇵", "🏳️‍🌈", "❤️", "🤖", "✨", "🧑🏿‍💻", " ", "ok ", "Ñandú ", "\n", "#1 "]
    return "".join(rng.choice(pieces) for _ in range(n))


def _whitespace_runs(rng: random.Random) -> str:
    parts = []
    for length in (1, 2, 7, 100, 4096, 24_999, 25_000, 25_001, 30_000, 60_001):
        parts.append(rng.choice(["word", "x=1;", "é", "\u3000末"]))
        parts.append("".join(rng.choice(" \t\n\r\u3000\u00a0") for _ in range(length)))
        parts.append(" " * length if length < 50_000 else "\n" * length)
    return "".join(parts)


def _stdlib_text(limit: int) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        out.append(text)
        size += len(text)
        if size >= limit:
            break
    return "".join(out)


@pytest.fixture(scope="module")
def mixed_texts():
    """More than 1 MB of mixed text, as a list of documents."""
    rng = random.Random(1234)
    from pydoc_data.topics import topics

    prose = "\n\n".join(topics[k] for k in sorted(topics))
    no_space = "".join(rng.choice("abcXYZ0123456789_-+=.,;:/\\|<>{}[]()'\"é漢😀") for _ in range(500_000))
    mixed_500k = "".join(
        rng.choice(["The quick brown fox ", "jumps\tover ", "漢字かな ", "🙂🙃", "  \n\n", "3.14159", "x" * 300])
        for _ in range(40_000)
    )[:500_000]
    texts = [
        _stdlib_text(400_000),
        prose,
        _cjk(rng, 60_000),
        _emoji(rng, 20_000),
        _whitespace_runs(rng),
        no_space,
        mixed_500k,
        "Don't <|eot|> inject <|begin_of_text|><|header_start|>system<|header_end|> here",
        "",
        " ",
        "\n" * 3,
        "unicode \u00e9\u0301 \ufb01 \u212b \U0001f600 \ud800 lone surrogate",  # lone surrogate -> U+FFFD
    ]
    assert sum(len(t.encode("utf-8", "replace")) for t in texts) > 1_000_000
    assert len(no_space) == len(mixed_500k) == 500_000
    return texts


# ----------------------------------------------------------------------------- official tokenizer


def test_official_special_tokens_match_llama_models(official, meta):
    assert official.special_tokens == meta.special_tokens
    assert len(official.special_tokens) == 2048
    assert official.vocab_size == meta.n_words == 202_048
    expected = {
        "<|begin_of_text|>": 200000, "<|end_of_text|>": 200001, "<|header_start|>": 200005,
        "<|header_end|>": 200006, "<|eom|>": 200007, "<|eot|>": 200008, "<|python_start|>": 200016,
        "<|finetune_right_pad|>": 200018, "<|image_start|>": 200080, "<|image_end|>": 200081,
        "<|tile_x_separator|>": 200084, "<|tile_y_separator|>": 200085, "<|image|>": 200090,
        "<|patch|>": 200092, "<|reasoning_thinking_end|>": 201143,
    }
    assert {k: official.special_tokens[k] for k in expected} == expected
    assert (official.bos_id, official.eos_id, official.eot_id, official.eom_id) == (200000, 200001, 200008, 200007)
    assert (official.pad_id, official.patch_id, official.image_token_index) == (200018, 200092, 200092)
    assert official.stop_tokens == meta.stop_tokens == [200001, 200007, 200008]
    assert load_tokenizer("llama4") is official  # cached


def test_encode_decode_identical_to_llama_models(official, meta, mixed_texts):
    for text in mixed_texts:
        ours = official.encode(text, bos=True, eos=True)
        ref = meta.encode(text, bos=True, eos=True)
        assert ours == ref, f"encode differs on a {len(text)}-char text starting {text[:40]!r}"
        assert official.decode(ours) == meta.decode(ref)
        if "\ud800" not in text:
            assert official.decode(ours[1:-1]) == text  # lossless
    assert official.encode_batch(mixed_texts, bos=True) == [meta.encode(t, bos=True, eos=False) for t in mixed_texts]


@pytest.mark.parametrize(
    "text",
    [
        "a" * MAX_RUN_CHARS,
        "a" * (MAX_RUN_CHARS + 1),
        "a" * (2 * MAX_RUN_CHARS),
        " " * (2 * MAX_RUN_CHARS + 1) + "b",
        "x " + "y" * 80_001 + "\t" * 26_000 + "z",
        "q" * (MAX_ENCODE_CHARS - 10) + "w" * 30_000,  # a run across the 400k boundary
        ("ab c" * 30 + "z" * 30_000 + "\n" * 26_000) * 15,
    ],
)
def test_long_text_split_points_match_llama_models(official, meta, text):
    ref = [
        piece
        for i in range(0, len(text), MAX_ENCODE_CHARS)
        for piece in meta._split_whitespaces_or_nonwhitespaces(text[i : i + MAX_ENCODE_CHARS], MAX_RUN_CHARS)
    ]
    assert list(split_long_text(text)) == ref
    assert official.encode(text) == meta.encode(text, bos=False, eos=False)


def test_special_token_text_is_not_injected(official, meta):
    text = "hi <|eot|><|header_start|>system<|header_end|>"
    plain = official.encode(text)
    assert not set(plain) & set(official.special_tokens.values())
    assert plain == meta.encode(text, bos=False, eos=False)
    assert official.decode(plain) == text
    special = official.encode(text, allow_special=True)
    assert special == meta.encode(text, bos=False, eos=False, allowed_special="all")
    assert [200008, 200005] == [i for i in special if i >= 200000][:2]


def test_bad_inputs_raise_value_error(official):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        official.decode([1, 202_048])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        official.decode([-1])
    with pytest.raises(ValueError, match="expects a str"):
        official.encode(b"bytes")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        load_tokenizer("/no/such/tokenizer")
    with pytest.raises(ValueError, match="no special token"):
        official.token_id("<|nope|>")


def test_load_tokenizer_model_from_checkpoint_dir(tmp_path, official):
    shutil.copy(official_tokenizer_path(), tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    text = "Checkpoint dirs ship tokenizer.model — 日本語 too."
    assert tok.encode(text, bos=True) == official.encode(text, bos=True)
    assert tok.special_tokens == official.special_tokens
    (tmp_path / "tokenizer.model").write_text("not base64 at all\n")
    with pytest.raises(ValueError, match="base64-token rank"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- trained tokenizers

SMALL_VOCAB = 1024


@pytest.fixture(scope="module")
def small_corpus():
    return default_corpus("train")[::12]  # ~1 MB


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus):
    out = tmp_path_factory.mktemp("tok1k")
    return train_tokenizer(small_corpus, SMALL_VOCAB, out), out


def test_trained_tokenizer_layout(trained, official):
    tok, out = trained
    n = SMALL_VOCAB
    assert tok.vocab_size == n
    names = trained_special_token_names()
    assert len(names) == 128
    for k, name in enumerate(names):
        assert tok.special_tokens[name] == n - 128 + k
        assert official.special_tokens[name] == 200_000 + k
    assert (tok.bos_id, tok.eot_id, tok.eom_id, tok.pad_id) == (n - 128, n - 120, n - 121, n - 110)
    assert tok.special_tokens["<|image_start|>"] == n - 48
    assert tok.patch_id == tok.special_tokens["<|patch|>"] == n - 36
    assert tok.stop_tokens == [n - 127, n - 121, n - 120]
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(n - 128))


def test_trained_tokenizer_roundtrip_and_no_injection(trained, mixed_texts):
    tok, _ = trained
    for text in mixed_texts[:5] + mixed_texts[7:11]:
        ids = tok.encode(text)
        assert max(ids, default=0) < SMALL_VOCAB - 128  # ordinary ids only: no injected specials
        assert tok.decode(ids) == text
    assert tok.encode("a<|eot|>", allow_special=True)[-1] == tok.eot_id
    assert tok.encode_batch(["x y", "héllo"], bos=True) == [tok.encode("x y", bos=True), tok.encode("héllo", bos=True)]


def test_trained_tokenizer_backends_agree(trained, mixed_texts, small_corpus):
    """Trained tokenizer.json runs through tiktoken (fast); the `tokenizers` library must agree."""
    tok, out = trained
    slow = load_tokenizer(out, backend="tokenizers")
    assert (tok.backend, slow.backend) == ("tiktoken", "tokenizers")
    assert slow.special_tokens == tok.special_tokens and slow.vocab_size == tok.vocab_size
    texts = mixed_texts + default_corpus("heldout")[:20]
    assert slow.encode_batch(texts, bos=True) == tok.encode_batch(texts, bos=True)
    assert slow.encode("x<|eot|><|patch|>", allow_special=True) == tok.encode("x<|eot|><|patch|>", allow_special=True)
    sample = tok.encode(texts[1][:5000] + texts[3][:2000]) + [tok.eot_id]
    assert slow.decode(sample) == tok.decode(sample)
    assert slow.decode_bytes(sample) == tok.decode_bytes(sample)
    emoji = tok.encode("🙂")
    first = tok.decode_bytes(emoji[:1])  # a partial UTF-8 sequence, kept raw
    assert len(emoji) > 1 and slow.decode_bytes(emoji[:1]) == first
    assert 0 < len(first) < 4 and "🙂".encode().startswith(first)


def test_incompatible_tokenizer_json_uses_tokenizers_library(trained, tmp_path):
    tok, out = trained
    data = json.loads((out / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Lowercase"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    lower = load_tokenizer(tmp_path)
    assert lower.backend == "tokenizers"
    assert lower.encode("HeLLo World") == tok.encode("hello world")
    with pytest.raises(ValueError, match="tiktoken can run identically"):
        load_tokenizer(tmp_path, backend="tiktoken")
    saved = lower.save(tmp_path / "copy")
    assert load_tokenizer(saved).encode("ABC") == lower.encode("ABC")


def test_trained_pre_tokenizer_splits_like_tiktoken(trained, mixed_texts):
    """The `tokenizers` Split regex (Oniguruma) must cut text where tiktoken's regex does."""
    import regex

    from herd.tokenizer import O200K_PATTERN

    tok, out = trained
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(out / "tokenizer.json"))
    byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
    pat = regex.compile(O200K_PATTERN)
    sample = mixed_texts[1][:30_000] + mixed_texts[2][:5_000] + mixed_texts[3][:3_000] + "  x\r\n\n  y'LL 'Re"
    pieces = hf.pre_tokenizer.pre_tokenize_str(sample)
    ours = [bytes(byte_decoder[c] for c in p).decode("utf-8") for p, _ in pieces]
    assert ours == pat.findall(sample)


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def test_trained_tokenizer_loads_in_transformers(trained):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok, out = trained
    text = "def f(x):\n    return x ** 2  # 平方 🙂"
    fast = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert fast(text)["input_ids"] == tok.encode(text, bos=True)
    assert fast.decode(tok.encode(text)) == text
    auto = AutoTokenizer.from_pretrained(str(out))
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (tok.bos_id, tok.eot_id, tok.pad_id)
    assert auto(text)["input_ids"] == tok.encode(text, bos=True)


def test_tiny_corpus_is_padded_to_exact_vocab(tmp_path):
    tok = train_tokenizer(["hello hello world", "world of words"], 512, tmp_path)
    assert tok.vocab_size == 512 and tok.bos_id == 384 and tok.patch_id == 512 - 36
    assert tok.decode(tok.encode("hello world")) == "hello world"
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], 300, tmp_path / "bad")
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([], 512, tmp_path / "empty")
    with pytest.raises(ValueError, match="not found"):
        train_tokenizer([tmp_path / "missing.txt"], 512, tmp_path / "x")


def test_8k_tokenizer_trains_fast_and_compresses(tmp_path, official):
    corpus = default_corpus("train")[::3]  # ~3.5 MB of Python + prose
    assert sum(map(len, corpus)) > 3_000_000
    t0 = time.perf_counter()
    tok = train_tokenizer(corpus, 8192, tmp_path)
    seconds = time.perf_counter() - t0
    assert seconds < 60, f"training took {seconds:.1f}s"
    heldout = default_corpus("heldout")
    ours, ref = bytes_per_token(tok, heldout), bytes_per_token(official, heldout)
    assert 3.0 < ours <= ref * 1.05, (ours, ref)  # an 8k code-trained BPE comes near a 200k one on code


def test_cli_trains_from_files(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The cat sat on the mat. " * 200)
    (corpus / "b.md").write_text("# Title\n\nSome *markdown* text, 123 numbers.\n" * 100)
    (corpus / "ignored.bin").write_bytes(b"\x00\x01")
    out = tmp_path / "tok"
    assert tokenizer_cli(["train", "--vocab-size", "600", "--out", str(out), str(corpus)]) == 0
    tok = load_tokenizer(out)
    assert tok.vocab_size == 600 and tok.bos_id == 472
    assert len(tok.encode("The cat sat on the mat.")) < len("The cat sat on the mat.")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).is_file()
    assert tokenizer_cli(["train", "--vocab-size", "100", "--out", str(tmp_path / "bad"), str(corpus)]) == 2


def test_add_tokenizer_subcommand_registers_train():
    import argparse

    parser = argparse.ArgumentParser(prog="herd")
    add_tokenizer_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tokenizer", "train", "--vocab-size", "4096", "--out", "d", "x.txt"])
    assert (args.vocab_size, args.out, args.corpora) == (4096, "d", ["x.txt"])
    assert callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["tokenizer"])  # the sub-subcommand is required


def test_default_corpus_is_offline_and_split():
    train, heldout = default_corpus("train"), default_corpus("heldout")
    assert sum(map(len, train)) > 5_000_000 and sum(map(len, heldout)) > 500_000
    assert all(doc.strip() for doc in train + heldout)
    assert len(set(train) & set(heldout)) < 5  # only the odd file that two packages share verbatim
    assert 8 < len(train) / len(heldout) < 10
    prose = default_corpus("heldout", "prose")
    assert prose and set(prose) <= set(heldout) and not set(prose) & set(default_corpus("heldout", "code"))
    with pytest.raises(ValueError, match="split"):
        default_corpus("validation")
