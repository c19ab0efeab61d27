"""Bad inputs raise ValueError saying what was expected; early fusion places features in order."""

from __future__ import annotations

import pytest
import torch

import herd
from tests.conftest import model_config


@pytest.fixture(scope="module")
def model():
    return herd.build_model(model_config(vision=True), seed=0).eval()


@pytest.mark.parametrize("ids,match", [
    (torch.tensor([[1, 2, 512]]), r"\[0, 512\)"),
    (torch.tensor([[1, -1]]), r"\[0, 512\)"),
    (torch.tensor([[1.0, 2.0]]), "integer dtype"),
    (torch.tensor([1, 2]), "2-D"),
])
def test_bad_token_ids(model, ids, match):
    with pytest.raises(ValueError, match=match):
        model(ids)


def test_bad_pixels(model):
    cfg = model.config
    ids = torch.full((1, 4), cfg.image_token_index)
    with pytest.raises(ValueError, match=r"\[n_tiles, 3, 28, 28\]"):
        model(ids, pixel_values=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="floating-point"):
        model(ids, pixel_values=torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="4 image tokens .* 8 features"):
        model(ids, pixel_values=torch.randn(2, 3, 28, 28))
    text_only = herd.build_model(model_config(vision=False))
    with pytest.raises(ValueError, match="text-only"):
        text_only(torch.tensor([[1, 2]]), pixel_values=torch.randn(1, 3, 28, 28))


def test_features_replace_image_tokens_in_order(model):
    cfg = model.config
    px = torch.randn(3, 3, 28, 28)
    ids = torch.randint(0, 400, (1, 30))
    slots = [2, 3, 4, 5, 10, 11, 12, 13, 20, 21, 22, 23]
    ids[0, slots] = cfg.image_token_index
    with torch.no_grad():
        feats = model.encode_images(px)  # [3 tiles × 4, H]
        h = model.embed(ids, px)
    torch.testing.assert_close(h[0, slots], feats)
    torch.testing.assert_close(h[0, 0], model.language_model.model.embed_tokens.weight[ids[0, 0]])


def test_batch_rows_are_independent(model):
    ids = torch.randint(0, 400, (3, 25))
    with torch.no_grad():
        full = model(ids)
        for b in range(3):
            torch.testing.assert_close(full[b], model(ids[b:b + 1])[0], atol=1e-5, rtol=1e-5)


def test_bf16_model_runs_and_tracks_fp32():
    m = herd.build_model(model_config(vision=True), seed=1).eval()
    ids = torch.randint(0, 400, (1, 40))
    with torch.no_grad():
        ref = m(ids)
        out = m.to(torch.bfloat16)(ids)
    assert out.dtype == torch.bfloat16
    assert torch.corrcoef(torch.stack([out.float().flatten(), ref.flatten()]))[0, 1] > 0.99
