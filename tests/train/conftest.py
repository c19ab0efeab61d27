"""A tiny chat-capable model directory (trained BPE + random Llama 4 with vision) for SFT/DPO tests."""

from __future__ import annotations

import pytest

import herd
from tests.conftest import model_config


def chat_model_dir(root, vision: bool = True, vocab: int = 1024, seed: int = 0):
    """root/tok (a byte-level BPE with the Llama 4 specials) and root/model (random weights, the
    test config's features: chunk 16, NoPE, temperature tuning, MoE) sharing its vocabulary."""
    from herd.tokenizer import load_tokenizer
    from herd.tokenizer_train import train_tokenizer

    tok_dir = root / "tok"
    if not (tok_dir / "tokenizer.json").exists():
        texts = ["Hello there. How are you? I am fine, thank you.", "The sum of 3 and 4 is 7.",
                 "def add(a, b):\n    return a + b\n", "Which digit is this? It is a seven."] * 20
        train_tokenizer(texts, vocab, tok_dir)
    tok = load_tokenizer(tok_dir)
    sp = tok.special_tokens
    cfg = model_config(vision=vision, text=dict(vocab_size=tok.vocab_size, bos_token_id=sp["<|begin_of_text|>"],
                                                eos_token_id=[sp["<|end_of_text|>"], sp["<|eom|>"], sp["<|eot|>"]]))
    if vision:
        cfg.image_token_index, cfg.boi_token_index = sp["<|patch|>"], sp["<|image_start|>"]
        cfg.eoi_token_index = sp["<|image_end|>"]
    model = herd.build_model(cfg, seed=seed)
    out = root / ("model" if vision else "model_text")
    herd.save_model(model, out)
    tok.save(out)
    return out, tok


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    return chat_model_dir(tmp_path_factory.mktemp("chat_model"))
