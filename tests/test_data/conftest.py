"""Fixtures for the data tests: a small tokenizer trained on bundled text, a shared cache dir,
and small data configs (first documents of each source only, so every build is quick)."""

from __future__ import annotations

import pytest

from herd.data.loader import DataConfig, training_texts

SMALL = dict(seq_len=64, batch_size=4, max_docs=30, val_fraction=0.2, val_batches=3, progress=False)


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A 1024-token byte-level BPE with the Llama 4 specials on top (trained in about a second)."""
    from herd.tokenizer_train import train_tokenizer

    texts = list(training_texts(limit=20))
    return train_tokenizer(texts, 1024, tmp_path_factory.mktemp("tok1024"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="session")
def vision():
    from herd.presets import get_config

    return get_config("tiny").vision  # 28-px tiles, 7-px patches: 4 <|patch|> tokens per tile


@pytest.fixture
def small(cache_dir):
    """small(**overrides) -> a small DataConfig using the shared cache."""

    def make(**over) -> DataConfig:
        kw = {**SMALL, "cache_dir": str(cache_dir), **over}
        return DataConfig(**kw)

    return make
