"""From messages to logits: chat format with two images → tiles → the tiny model's early fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import herd
from herd.chat import encode_messages
from herd.tokenizer_train import train_tokenizer


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    texts = ["the quick brown fox jumps over the lazy dog " * 20, "def f(x):\n    return x * 2\n" * 20]
    return train_tokenizer(texts, herd.get_config("tiny").text.vocab_size, tmp_path_factory.mktemp("tok"))


def test_two_images_through_chat_format_and_model(tiny_tokenizer):
    model = herd.load_model("tiny")
    cfg = model.config
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 255, (30, 90, 3), dtype=np.uint8))  # → several tiles + global
    small = Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))  # → one tile
    messages = [{"role": "user", "content": [
        {"type": "image", "image": wide}, {"type": "text", "text": "and"},
        {"type": "image", "image": small}, {"type": "text", "text": "what differs?"}]}]
    ids, tiles = encode_messages(tiny_tokenizer, messages, vision_config=cfg.vision)
    assert len(tiles) == 2 and tiles[0].shape[0] > 1 and tiles[1].shape[0] == 1
    pixel_values = torch.cat(tiles)  # [n_tiles, 3, 28, 28]
    input_ids = torch.tensor([ids])
    n_patch = int((input_ids == cfg.image_token_index).sum())
    with torch.no_grad():
        features = model.encode_images(pixel_values)
        logits = model(input_ids, pixel_values=pixel_values)
    assert n_patch == features.shape[0] == pixel_values.shape[0] * cfg.vision.tokens_per_tile
    assert logits.shape == (1, len(ids), cfg.text.vocab_size) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="image tokens"):  # one image's tiles missing
        model(input_ids, pixel_values=tiles[0])
