"""A tiny random multimodal Llama 4 saved as a model directory with its own trained tokenizer
(vocab 512, 28-px tiles of 4 tokens): what `herd vqa / ask-repo / summarize --model DIR` read."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import random_model_dir

CORPUS = ["The quick brown fox jumps over the lazy dog. def main(): return 0\n" * 40,
          "Hello world, how are you today? import os, sys; class Config: pass\n" * 40,
          "<file path=\"a/b.py\"> </file> Question: Answer with the path of the file. 0123456789 " * 20]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs torch on one thread (tests.conftest.one_thread)."""


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return random_model_dir(tmp_path_factory.mktemp("usecase_model"), CORPUS, 512, vision=True, seed=1,
                            text=dict(intermediate_size=64, intermediate_size_mlp=128))


@pytest.fixture
def png(tmp_path):
    def make(name: str, seed: int = 0, size=(40, 60)) -> str:
        rng = np.random.default_rng(seed)
        path = tmp_path / name
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        return str(path)
    return make
