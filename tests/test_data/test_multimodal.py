"""Multimodal batches: #<|patch|> == n_tiles × tokens_per_tile, tiles in placeholder order,
captions naming the digit shown, no loss on image tokens; the digit evaluation set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from herd.data.images import load_digits, normalize_tiles
from herd.data.loader import build_datasets
from herd.data.multimodal import CAPTION_TEMPLATE, digit_eval_set
from herd.image import VisionSettings, preprocess_image


def _digit_images():
    images, labels, ids = load_digits()
    return {i: (im, int(lab)) for i, im, lab in zip(ids, images, labels)}


def _image_spans(ids, start_id, end_id):
    starts, ends = np.flatnonzero(ids == start_id), np.flatnonzero(ids == end_id)
    assert len(starts) == len(ends)
    return list(zip(starts, ends))


@pytest.mark.parametrize("image_size", [28, 14])  # one tile; or 2×2 tiles + a global tile
def test_patch_count_order_and_captions(tok, small, vision, image_size):
    vc = vision if image_size == 28 else type(vision)(**{**vision.__dict__, "image_size": 14})
    settings = VisionSettings.from_config(vc)
    per_image = 1 if image_size == 28 else 5
    cfg = small(weights={"shakespeare": 0.5, "digits": 0.5}, max_images_per_sequence=3)
    train, _ = build_datasets(tok, cfg, vc, image_token_index=tok.special_tokens["<|patch|>"])
    sp = tok.special_tokens
    patch, start, end = sp["<|patch|>"], sp["<|image_start|>"], sp["<|image_end|>"]
    digits = _digit_images()
    seen_images = 0
    for _ in range(8):
        batch = next(train)
        ids, labels = batch.input_ids.numpy(), batch.labels.numpy()
        n_tiles = 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
        assert int((ids == patch).sum()) == n_tiles * settings.tokens_per_tile  # what the model checks
        assert n_tiles == batch.n_images * per_image
        if n_tiles:
            assert batch.pixel_values.shape[1:] == (3, image_size, image_size)
        # Tiles are in the order of the placeholders, row-major over the batch.
        tile = 0
        for r, segs in enumerate(batch.segments):
            images_in_row = [doc_id for source, doc_id, a, b in segs if source == "digits"]
            spans = _image_spans(ids[r], start, end)
            assert len(spans) == len(images_in_row) <= 3
            for (s, e), doc_id in zip(spans, images_in_row):
                image, label = digits[doc_id]
                ref = preprocess_image(Image.fromarray(image, "L").convert("RGB"), vc).tiles
                assert torch.equal(batch.pixel_values[tile : tile + per_image], ref)
                tile += per_image
                caption = ids[r, e + 1 : e + 1 + len(tok.encode(CAPTION_TEMPLATE.format(digit=label)))]
                assert tok.decode(caption) == f"This is a handwritten digit {label}."
                assert ids[r, s - 1] == sp["<|begin_of_text|>"]
                assert (labels[r, s - 1 : e] == -100).all()  # no loss on targets inside the image
                assert labels[r, e] == ids[r, e + 1]  # the caption is learnt from the image
                seen_images += 1
        assert tile == n_tiles
    assert seen_images >= 8


def test_layout_uses_separators_for_multi_tile(tok, small, vision):
    vc = type(vision)(**{**vision.__dict__, "image_size": 14})
    train, _ = build_datasets(tok, small(weights={"digits": 1.0}), vc)
    row = next(train).input_ids[0].tolist()
    sp = tok.special_tokens
    first = row.index(sp["<|image_start|>"])
    expect = ["<|image_start|>", "<|patch|>", "<|tile_x_separator|>", "<|patch|>", "<|tile_y_separator|>",
              "<|patch|>", "<|tile_x_separator|>", "<|patch|>", "<|tile_y_separator|>", "<|image|>", "<|patch|>",
              "<|image_end|>"]
    assert row[first : first + len(expect)] == [sp[n] for n in expect]


def test_normalisation_matches_inference(vision):
    images, _, _ = load_digits(limit=3)
    from herd.data.images import digit_tiles

    tiles, grid = digit_tiles(images, vision)
    assert grid == (1, 1) and tiles.shape == (len(images), 1, 28, 28)
    for im, t in zip(images, tiles):
        ref = preprocess_image(Image.fromarray(im, "L").convert("RGB"), vision).tiles
        assert torch.equal(normalize_tiles(t), ref)


def test_mismatched_patch_id_and_missing_vision_config(tok, small, vision):
    with pytest.raises(ValueError, match="image_token_index"):
        build_datasets(tok, small(weights={"digits": 1.0}), vision, image_token_index=7)
    with pytest.raises(ValueError, match="vision config"):
        build_datasets(tok, small(weights={"bible": 1.0, "digits": 1.0}))


def test_digit_eval_set(tok, small, vision):
    cfg = small()
    ev = digit_eval_set(tok, vision, cfg)
    n = len(ev)
    assert n > 0 and ev.input_ids.shape[0] == n and ev.pixel_values.shape == (n, 3, 28, 28)
    assert [tok.decode([i]) for i in ev.candidate_ids.tolist()] == [str(d) for d in range(10)]
    prompt = tok.decode(ev.input_ids[0].tolist())
    assert prompt.endswith("<|image_end|>This is a handwritten digit ")
    assert prompt.count("<|patch|>") == 4
    digits = _digit_images()
    for k in range(n):
        image, label = digits[ev.doc_ids[k]]
        assert ev.targets[k] == label
        caption = tok.encode(CAPTION_TEMPLATE.format(digit=label))
        # prompt text + the right candidate is exactly how training captions begin
        text_ids = ev.input_ids[k, 1 + 7 :].tolist()
        assert caption[: len(text_ids) + 1] == text_ids + [int(ev.candidate_ids[label])]
    # evaluation images are the held-out ones: never in training batches
    train, _ = build_datasets(tok, cfg, vision)
    train_ids = {d for _ in range(40) for segs in next(train).segments for s, d, *_ in segs if s == "digits"}
    assert train_ids and not train_ids & set(ev.doc_ids)
    # accuracy: perfect logits give 1, logits pointing at another digit give 0
    logits = torch.zeros(n, tok.vocab_size)
    logits[torch.arange(n), ev.candidate_ids[ev.targets]] = 5.0
    assert ev.accuracy(logits) == 1.0
    logits2 = torch.zeros(n, 3, tok.vocab_size)
    logits2[torch.arange(n), -1, ev.candidate_ids[(ev.targets + 1) % 10]] = 5.0
    assert ev.accuracy(logits2) == 0.0
    # a limited set is spread over the whole split (sources are stored class by class: a prefix
    # would miss classes), keeping its first and last image
    part = digit_eval_set(tok, vision, cfg, limit=n // 3)
    assert len(part) == n // 3 and set(part.doc_ids) <= set(ev.doc_ids)
    assert part.doc_ids[0] == ev.doc_ids[0] and part.doc_ids[-1] == ev.doc_ids[-1]
    got = [len(t) for _, _, t in ev.batches(4)]
    assert sum(got) == n and max(got) <= 4
