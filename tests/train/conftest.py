"""A tiny chat-capable model directory (trained BPE + random Llama 4 with vision) for SFT/DPO tests."""

from __future__ import annotations

import pytest

from tests.conftest import random_model_dir

CHAT_TEXTS = ["Hello there. How are you? I am fine, thank you.", "The sum of 3 and 4 is 7.",
              "def add(a, b):\n    return a + b\n", "Which digit is this? It is a seven."] * 20


def chat_model_dir(root, vision: bool = True, vocab: int = 1024, seed: int = 0):
    """root/model (root/model_text without vision): random weights with the test config's features
    (chunk 16, NoPE, temperature tuning, MoE) and a byte-level BPE with the Llama 4 specials sharing
    its vocabulary, BOS and end-of-turn ids → (directory, tokenizer)."""
    from herd.tokenizer import load_tokenizer

    out = random_model_dir(root / ("model" if vision else "model_text"), CHAT_TEXTS, vocab, vision=vision, seed=seed,
                           chat_ids=True)
    return out, load_tokenizer(out)


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    return chat_model_dir(tmp_path_factory.mktemp("chat_model"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> str:
    """A byte-level BPE of the tiny preset's vocabulary trained on the first 120 bundled texts
    (herd train's --tokenizer DIR), shared by the trainer and distillation suites."""
    import herd
    from herd.data import training_texts
    from herd.tokenizer_train import train_tokenizer

    d = tmp_path_factory.mktemp("tiny_tok")
    texts = [t for _, t in zip(range(120), training_texts(limit=40))]
    train_tokenizer(texts, herd.get_config("tiny").text.vocab_size, d)
    return str(d)
