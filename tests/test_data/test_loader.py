"""The trainer's API: determinism, exact resume, rank sharding, validation, the token cache,
the unigram baseline and the `herd data` command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from herd.data.cache import text_corpus, tokenizer_fingerprint
from herd.data.loader import DataConfig, build_datasets, unigram_baseline

MIX = {"shakespeare": 0.3, "bible": 0.2, "python": 0.3, "docs": 0.1, "digits": 0.1}


def _same(a, b) -> bool:
    pa, pb = a.pixel_values, b.pixel_values
    return (torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels) and a.n_tokens == b.n_tokens
            and (pa is None) == (pb is None) and (pa is None or torch.equal(pa, pb)))


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def test_same_seed_same_batches_other_seed_others(tok, small, vision):
    a, _ = build_datasets(tok, small(weights=MIX), vision)
    b, _ = build_datasets(tok, small(weights=MIX), vision)
    c, _ = build_datasets(tok, small(weights=MIX, seed=1), vision)
    xs, ys, zs = _take(a, 6), _take(b, 6), _take(c, 6)
    assert all(_same(x, y) for x, y in zip(xs, ys))
    assert not all(_same(x, z) for x, z in zip(xs, zs))
    assert any(x.pixel_values is not None for x in xs)  # the mixture really holds images


def test_resume_is_exact(tok, small, vision):
    cfg = small(weights=MIX)
    ref, _ = build_datasets(tok, cfg, vision)
    expected = _take(ref, 12)[7:]
    run, _ = build_datasets(tok, cfg, vision)
    _take(run, 7)
    state = json.loads(json.dumps(run.state_dict()))  # survives a JSON checkpoint
    resumed, _ = build_datasets(tok, cfg, vision)  # a new process, in effect
    resumed.load_state_dict(state)
    got = _take(resumed, 5)
    assert all(_same(x, y) for x, y in zip(got, expected))
    assert resumed.state_dict() == ref.state_dict()


def test_resume_refuses_other_settings(tok, small, vision):
    run, _ = build_datasets(tok, small(weights=MIX), vision)
    state = run.state_dict()
    other, _ = build_datasets(tok, small(weights=MIX, seq_len=32), vision)
    with pytest.raises(ValueError, match="different data or settings"):
        other.load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shards_are_disjoint_and_cover_the_global_batch(tok, small, vision, world_size):
    cfg = small(weights=MIX)
    full, _ = build_datasets(tok, cfg, vision)
    _take(full, 2)
    ranks = [full.shard(r, world_size) for r in range(world_size)]  # sharding mid-run keeps the position
    for _ in range(4):
        whole = next(full)
        parts = [next(r) for r in ranks]
        assert all(p.input_ids.shape[0] == cfg.batch_size // world_size for p in parts)
        assert torch.equal(torch.cat([p.input_ids for p in parts]), whole.input_ids)
        assert torch.equal(torch.cat([p.labels for p in parts]), whole.labels)
        assert sum(p.n_tokens for p in parts) == whole.n_tokens
        pv = [p.pixel_values for p in parts if p.pixel_values is not None]
        if whole.pixel_values is None:
            assert not pv
        else:
            assert torch.equal(torch.cat(pv), whole.pixel_values)
        segs = [tuple(map(tuple, s)) for p in parts for s in p.segments]
        assert segs == [tuple(map(tuple, s)) for s in whole.segments]  # rank r holds rows r·b .. (r+1)·b - 1
    assert all(r.state_dict() == full.state_dict() for r in ranks)  # one state resumes every rank
    sharded, _ = build_datasets(tok, cfg, vision, rank=1, world_size=world_size)
    assert sharded.local_batch_size == cfg.batch_size // world_size
    with pytest.raises(ValueError, match="divisible"):
        full.shard(0, 3)


def test_validation_is_fixed_and_disjoint_from_train(tok, small, vision):
    cfg = small(weights=MIX)
    train, val = build_datasets(tok, cfg, vision)
    first, second = list(val), list(val)
    assert len(first) == len(val) == cfg.val_batches
    assert all(_same(x, y) for x, y in zip(first, second))
    _, val_other_seed = build_datasets(tok, small(weights=MIX, seed=5), vision)
    assert all(_same(x, y) for x, y in zip(first, val_other_seed))  # validation does not depend on the seed
    val_docs = {(s, d) for b in first for segs in b.segments for s, d, *_ in segs}
    train_docs = {(s, d) for _ in range(60) for segs in next(train).segments for s, d, *_ in segs}
    assert val_docs and train_docs and not val_docs & train_docs
    # python files and their docstrings fall on the same side
    def files(docs):
        return {d.removeprefix("docstrings:") for s, d in docs if s in ("python", "docs")} - {""}

    assert not files(val_docs) & files(train_docs)


def test_no_validation_when_asked_for_none(tok, small, vision):
    train, val = build_datasets(tok, small(weights=MIX, val_fraction=0.0), vision)
    assert len(val) == 0 and list(val) == []
    assert next(train).input_ids.shape == (4, 64)
    with pytest.raises(ValueError, match="no validation"):
        unigram_baseline(train)


def test_unigram_baseline(tok, small, vision):
    train, val = build_datasets(tok, small(weights=MIX), vision)
    before = train.state_dict()
    u = unigram_baseline(train, max_train_tokens=20_000)
    assert train.state_dict() == before  # uses a fresh copy; the live stream does not move
    assert 1.0 < u < math.log(tok.vocab_size)
    # recompute by hand on the same tokens
    counts = np.zeros(tok.vocab_size)
    fresh, seen = train.fresh(), 0
    while seen < 20_000:
        lab = next(fresh).labels
        lab = lab[lab != -100].numpy()
        np.add.at(counts, lab, 1)
        seen += len(lab)
    vl = np.concatenate([b.labels[b.labels != -100].numpy() for b in val])
    p = (counts + 1) / (counts.sum() + tok.vocab_size)
    assert u == pytest.approx(float(-np.log(p[vl]).mean()), rel=1e-9)


class CountingTokenizer:
    """Wraps a tokenizer and counts the texts it encodes in batches."""

    def __init__(self, inner):
        self.inner, self.encoded = inner, 0
        self.vocab_size, self.special_tokens, self.source = inner.vocab_size, inner.special_tokens, inner.source

    def encode(self, text, **kw):
        return self.inner.encode(text, **kw)

    def encode_batch(self, texts, **kw):
        self.encoded += len(texts)
        return self.inner.encode_batch(texts, **kw)


def test_cache_is_reused_and_invalidated_by_a_new_tokenizer(tok, tmp_path):
    from herd.tokenizer_train import train_tokenizer

    counting = CountingTokenizer(tok)
    first = text_corpus(counting, "bible", tmp_path, limit=12)
    assert first.built and counting.encoded == 12 and first.n_docs == 12
    again = text_corpus(counting, "bible", tmp_path, limit=12)
    assert not again.built and counting.encoded == 12  # nothing re-tokenised
    assert again.path == first.path and np.array_equal(again.tokens, first.tokens)
    assert not list(tmp_path.rglob(".tmp-*"))  # atomic: no temporary entries left

    other = train_tokenizer(["Genesis and Exodus and Leviticus " * 50, "def f(x): return x\n" * 50], 512,
                            tmp_path / "tok512")
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
    counting2 = CountingTokenizer(other)
    rebuilt = text_corpus(counting2, "bible", tmp_path, limit=12)
    assert rebuilt.built and counting2.encoded == 12 and rebuilt.path != first.path
    assert not np.array_equal(rebuilt.tokens, first.tokens)
    assert text_corpus(tok, "bible", tmp_path, limit=12).path == first.path  # the old entry is still valid


def test_failed_build_leaves_no_entry(tok, tmp_path):
    class Broken(CountingTokenizer):
        def encode_batch(self, texts, **kw):
            raise RuntimeError("crash while tokenising")

    with pytest.raises(RuntimeError):
        text_corpus(Broken(tok), "shakespeare", tmp_path, limit=3)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    assert text_corpus(tok, "shakespeare", tmp_path, limit=3).built


def test_data_config_checks_and_roundtrip():
    with pytest.raises(ValueError, match="unknown data sources"):
        DataConfig(weights={"wikipedia": 1.0})
    with pytest.raises(ValueError, match="weights"):
        DataConfig(weights={"bible": 0.0})
    cfg = DataConfig(seq_len=128, weights={"bible": 1.0}, max_docs=5)
    assert DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_cli_prepare_and_show(tok, cache_dir, capsys):
    from herd.data.cli import data_cli

    args = ["--tokenizer", str(tok.source.parent), "--cache-dir", str(cache_dir), "--max-docs", "30",
            "--seq-len", "64", "--batch-size", "4"]
    assert data_cli(["prepare", *args]) == 0
    out = capsys.readouterr().out
    for name in ("shakespeare", "bible", "python", "docs", "digits", "total"):
        assert name in out
    assert "train docs" in out and "val tokens" in out
    assert data_cli(["show", *args, "--weights", "digits=1", "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "<|patch|>×4" in out and "This is a handwritten digit" in out
