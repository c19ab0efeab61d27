"""A tiny random multimodal Llama 4 saved as a model directory with its own trained tokenizer
(vocab 512, 28-px tiles of 4 tokens): what `herd vqa / ask-repo / summarize --model DIR` read."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import herd
from tests.conftest import model_config

CORPUS = ["The quick brown fox jumps over the lazy dog. def main(): return 0\n" * 40,
          "Hello world, how are you today? import os, sys; class Config: pass\n" * 40,
          "<file path=\"a/b.py\"> </file> Question: Answer with the path of the file. 0123456789 " * 20]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs torch on one thread (tests.conftest.one_thread)."""


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from herd.tokenizer_train import train_tokenizer

    d = tmp_path_factory.mktemp("usecase_model")
    tok = train_tokenizer(CORPUS, vocab_size=512, out_dir=d)
    cfg = model_config(vision=True, text=dict(intermediate_size=64, intermediate_size_mlp=128))
    assert tok.special_tokens["<|patch|>"] == cfg.image_token_index
    herd.save_model(herd.build_model(cfg, seed=1).eval(), d)
    return d


@pytest.fixture
def png(tmp_path):
    def make(name: str, seed: int = 0, size=(40, 60)) -> str:
        rng = np.random.default_rng(seed)
        path = tmp_path / name
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        return str(path)
    return make
