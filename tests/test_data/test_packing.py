"""Packing: BOS/EOS at document boundaries, labels = shifted inputs with -100 where no loss,
every token packed exactly once, images never cut, the cached ids equal the tokenizer's."""

from __future__ import annotations

import numpy as np
import pytest

from herd.data.loader import build_datasets
from herd.data.mixture import MixtureSampler, mixture_probs
from herd.data.packing import Packer, TextUnits, materialize_rows

BOS, EOS, PAD = 1000, 1001, 1002


class FakeCorpus:
    """Documents of known ids: doc i is [i*100, i*100 + 1, ...] of length lengths[i]."""

    name = "fake"

    def __init__(self, lengths):
        self.docs = [np.arange(i * 100, i * 100 + n) % 997 for i, n in enumerate(lengths)]
        self.doc_ids = [f"d{i}" for i in range(len(lengths))]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])

    def doc_lengths(self):
        return np.diff(self.offsets)

    def doc(self, i):
        return self.docs[i]


class FakeImages:
    """Atomic units of a fixed length (stand-ins for image documents)."""

    atomic, images_per_unit, name = True, 1, "img"

    def __init__(self, n, length):
        self.n, self.length = n, length

    def __len__(self):
        return self.n

    def unit(self, i):
        return i, 0, self.length

    def max_tokens(self):
        return self.length

    def mean_tokens(self):
        return float(self.length)


def _packer(units, probs, seq_len, max_images=4, seed=0):
    sampler = MixtureSampler([len(u) for u in units], probs, seed=seed)
    return Packer(units, sampler, seq_len, max_images)


def test_every_token_packed_once_per_epoch_and_rows_full():
    lengths = [5, 17, 64, 3, 208, 1, 40]  # 352 tokens with BOS/EOS: 11 rows
    units = TextUnits(FakeCorpus(lengths), np.arange(len(lengths)), piece_len=32, bos_id=BOS, eos_id=EOS)
    packer = _packer([units], [1.0], seq_len=32)
    total = sum(n + 2 for n in lengths)
    spans, used = {}, 0
    while used < total:  # exactly one epoch of tokens (rows are never padded without images)
        row = packer.next_row()
        assert sum(b - a for _, _, a, b in row) == 32
        for _, doc, a, b in row:
            spans.setdefault(doc, []).append((a, b))
            used += b - a
    assert used == total
    for doc, n in enumerate(lengths):
        s = sorted(spans[doc])
        assert s[0][0] == 0 and s[-1][1] == n + 2
        assert all(x[1] == y[0] for x, y in zip(s, s[1:]))  # the pieces tile <bos> doc <eos> exactly


def test_bos_eos_and_shifted_labels_on_synthetic_rows():
    lengths = [5, 40, 3, 70]
    corpus = FakeCorpus(lengths)
    units = TextUnits(corpus, np.arange(4), piece_len=16, bos_id=BOS, eos_id=EOS)
    packer = _packer([units], [1.0], seq_len=16)
    rows = [packer.next_row() for _ in range(12)]
    batch = materialize_rows([units], rows, 16, PAD)
    ids, labels = batch.input_ids.numpy(), batch.labels.numpy()
    for r, row in enumerate(rows):
        pos = 0
        for _, doc, a, b in row:
            full = np.concatenate([[BOS], corpus.doc(doc), [EOS]])
            assert ids[r, pos : pos + b - a].tolist() == full[a:b].tolist()
            expect = [int(full[t + 1]) if t + 1 < len(full) else -100 for t in range(a, b)]
            assert labels[r, pos : pos + b - a].tolist() == expect
            # inside a piece the labels are the inputs shifted by one
            assert labels[r, pos : pos + b - a - 1].tolist() == ids[r, pos + 1 : pos + b - a].tolist()
            assert (ids[r, pos] == BOS) == (a == 0)
            pos += b - a
    assert (labels == BOS).sum() == 0  # BOS is never a target
    assert labels[ids == EOS].tolist() == [-100] * int((ids == EOS).sum())  # nothing predicted across documents
    assert batch.n_tokens == int((labels != -100).sum())


def test_images_are_never_cut_and_capped_per_row():
    text = TextUnits(FakeCorpus([50, 90, 30, 200]), np.arange(4), piece_len=24, bos_id=BOS, eos_id=EOS)
    images = FakeImages(n=40, length=9)
    probs = mixture_probs([0.5, 0.5], [text.mean_tokens(), images.mean_tokens()])
    packer = _packer([text, images], probs, seq_len=24, max_images=2)
    n_images = 0
    for _ in range(300):
        row = packer.next_row()
        assert sum(b - a for _, _, a, b in row) <= 24
        imgs = [seg for seg in row if seg[0] == 1]
        assert all(a == 0 and b == 9 for _, _, a, b in imgs)  # whole
        assert len(imgs) <= 2
        n_images += len(imgs)
    assert n_images > 100 and len(packer.deferred) <= 2


def test_image_backlog_is_bounded_by_padding():
    """Images arriving faster than max_images per row: rows are padded, the backlog stays bounded,
    and every image still gets placed in order of arrival."""
    text = TextUnits(FakeCorpus([50, 90]), np.arange(2), piece_len=24, bos_id=BOS, eos_id=EOS)
    images = FakeImages(n=1000, length=9)
    packer = _packer([text, images], [0.1, 0.9], seq_len=24, max_images=1)
    padded = 0
    for _ in range(200):
        row = packer.next_row()
        assert len(packer.deferred) <= 1
        assert sum(seg[0] == 1 for seg in row) <= 1
        padded += sum(b - a for _, _, a, b in row) < 24
    assert padded > 100


def test_image_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="do not fit seq_len"):
        _packer([FakeImages(3, 40)], [1.0], seq_len=32)
    with pytest.raises(ValueError, match="no room"):
        _packer([FakeImages(3, 4)], [1.0], seq_len=32, max_images=0)


def test_mixture_gives_token_shares():
    short = TextUnits(FakeCorpus([6] * 200), np.arange(200), piece_len=64, bos_id=BOS, eos_id=EOS)
    long = TextUnits(FakeCorpus([126] * 50), np.arange(50), piece_len=64, bos_id=BOS, eos_id=EOS)
    probs = mixture_probs([0.25, 0.75], [short.mean_tokens(), long.mean_tokens()])
    packer = _packer([short, long], probs, seq_len=64)
    tokens = np.zeros(2)
    for _ in range(400):
        for s, _, a, b in packer.next_row():
            tokens[s] += b - a
    assert abs(tokens[0] / tokens.sum() - 0.25) < 0.03


def test_real_rows_match_the_tokenizer(tok, small, vision):
    """Rows built from the cache hold exactly <bos> + tokenizer.encode(document) + <eos> pieces."""
    from herd.data.sources import load_documents

    cfg = small(weights={"bible": 1.0, "python": 1.0})
    train, _ = build_datasets(tok, cfg)
    texts = {(name, d.doc_id): d.text for name in ("bible", "python") for d in load_documents(name, limit=30)}
    bos, eos = tok.special_tokens["<|begin_of_text|>"], tok.special_tokens["<|end_of_text|>"]
    n_bos = 0
    for _ in range(30):
        batch = next(train)
        ids, labels = batch.input_ids.numpy(), batch.labels.numpy()
        assert ids.shape == labels.shape == (4, 64) and batch.pixel_values is None
        for r, segs in enumerate(batch.segments):
            pos = 0
            for source, doc_id, a, b in segs:
                full = [bos, *tok.encode(texts[(source, doc_id)]), eos]
                assert ids[r, pos : pos + b - a].tolist() == full[a:b]
                assert labels[r, pos : pos + b - a].tolist() == [full[t + 1] if t + 1 < len(full) else -100
                                                                 for t in range(a, b)]
                n_bos += a == 0
                pos += b - a
            assert (labels[r, pos:] == -100).all()
        assert batch.n_tokens == int((labels != -100).sum())
    assert n_bos >= 1
