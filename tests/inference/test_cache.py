"""KV cache: incremental decode equals the full forward; chunked layers keep one chunk only.

The configs switch on every Llama 4 feature that touches the cache: chunked attention with
chunk 16 (so a 70-token sequence crosses four chunk boundaries), NoPE layers every 4th layer,
temperature tuning from position 3 (floor_scale 4), QK-norm, and an image in the prompt.
"""

from __future__ import annotations

import pytest
import torch

import herd
from herd.inference.cache import KVCache
from tests.conftest import model_config

TOL = 1e-4


def _model(vision: bool, **text):
    cfg = model_config(vision=vision, text=text or None)
    return herd.build_model(cfg, seed=1).eval(), cfg


def _image_prompt(cfg, T, gen):
    ids = torch.randint(0, cfg.text.vocab_size - 128, (1, T), generator=gen)
    per = cfg.vision.tokens_per_tile
    ids[0, 20:20 + 2 * per] = cfg.image_token_index  # two tiles straddling the chunk boundary at 24
    px = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen)
    return ids, px


def _incremental(model, ids, seg_sizes, feats=None, cache=None, image_token=None):
    """Logits for ids [1, T] fed through the cache in segments of the given sizes (cycled)."""
    cache = cache or KVCache.for_model(model, 1, capacity=8)  # small: the cache has to grow
    outs, a, i, used = [], 0, 0, 0
    while a < ids.shape[1]:
        n = seg_sizes[i % len(seg_sizes)]
        seg = ids[:, a:a + n]
        f = None
        if feats is not None:
            k = int((seg == image_token).sum())
            f, used = (feats[used:used + k] if k else None), used + k
        outs.append(model(seg, image_features=f, cache=cache))
        a, i = a + n, i + 1
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("segments", [[1], [5, 1, 13, 2], [16], [40, 1]])
def test_incremental_equals_full_forward_text(segments):
    model, cfg = _model(False)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.text.vocab_size, (1, 70), generator=gen)
    with torch.no_grad():
        full = model(ids)
        inc, cache = _incremental(model, ids, segments)
    err = (inc - full).abs().max().item()
    assert err <= TOL, f"segments {segments}: max |Δlogits| = {err:.2e}"
    assert cache.lengths[0] == 70
    # the check has teeth: dropping temperature tuning, or the chunk boundaries, moves the logits
    # well beyond the tolerance
    model.layers[3].self_attn.temperature_tuning = False
    with torch.no_grad():
        assert (model(ids) - full).abs().max().item() > 10 * TOL
    model.layers[3].self_attn.temperature_tuning = True
    for layer in model.layers[:3]:
        layer.self_attn.chunk = None
    with torch.no_grad():
        assert (model(ids) - full).abs().max().item() > 100 * TOL


def test_incremental_equals_full_forward_with_image():
    model, cfg = _model(True)
    gen = torch.Generator().manual_seed(1)
    ids, px = _image_prompt(cfg, 60, gen)
    with torch.no_grad():
        full = model(ids, pixel_values=px)
        feats = model.encode_images(px)
        inc, _ = _incremental(model, ids, [7, 1, 3], feats, image_token=cfg.image_token_index)
        blind = model(ids)
    assert (inc - full).abs().max().item() <= TOL
    assert (blind - full).abs().max().item() > 100 * TOL  # the image matters


def test_chunked_layers_hold_one_chunk_global_layers_everything():
    model, cfg = _model(False, num_hidden_layers=4)
    chunk = cfg.text.attention_chunk_size
    cache = KVCache.for_model(model, 1, capacity=100)
    chunked = [i for i in range(4) if cache.chunks[i] is not None]
    glob = [i for i in range(4) if cache.chunks[i] is None]
    assert chunked == [0, 1, 2] and glob == [3]
    ids = torch.randint(0, 500, (1, 90))
    with torch.no_grad():
        model(ids[:, :30], cache=cache)
        for t in range(30, 90):
            model(ids[:, t:t + 1], cache=cache)
            for i in chunked:
                assert cache.slots(i) <= chunk
                assert cache.positions_held(i) == t % chunk + 1 <= chunk
            for i in glob:
                assert cache.positions_held(i) == t + 1
    assert all(cache.k[i].shape[2] == chunk for i in chunked)
    assert cache.k[3].shape[2] >= 90
    per_pos = 2 * cfg.text.num_key_value_heads * cfg.text.head_dim * 4
    assert cache.nbytes("chunked") == 3 * chunk * per_pos
    assert cache.nbytes("global") == cache.capacity * per_pos


def test_batched_rows_at_different_positions_match_single_rows():
    """Rows of one decode batch at different positions (and different chunk offsets)."""
    model, cfg = _model(False)
    gen = torch.Generator().manual_seed(2)
    lens = [3, 17, 33, 16]
    prompts = [torch.randint(0, 500, (1, n), generator=gen) for n in lens]
    nxt = torch.randint(0, 500, (len(lens), 6), generator=gen)
    with torch.no_grad():
        solo = []
        for r, p in enumerate(prompts):
            c = KVCache.for_model(model, 1, 64)
            model(p, cache=c)
            solo.append(torch.cat([model(nxt[r:r + 1, t:t + 1], cache=c) for t in range(6)], 1))
        cache = KVCache.for_model(model, len(lens), 64)
        for r, p in enumerate(prompts):
            model(p, cache=cache.select(r, 1))
        cache.select(0, len(lens))
        assert cache.next_position.tolist() == lens
        batched = torch.cat([model(nxt[:, t:t + 1], cache=cache) for t in range(6)], 1)
    for r in range(len(lens)):
        assert (batched[r] - solo[r][0]).abs().max().item() <= TOL


def test_int8_kv_is_close_and_smaller():
    model, cfg = _model(False)
    ids = torch.randint(0, 500, (1, 50), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        c8 = KVCache.for_model(model, 1, 64, kv_dtype="int8", block_size=16)  # several dequant blocks
        inc, _ = _incremental(model, ids, [20, 1, 1, 3], cache=c8)
    err = (inc - full).abs().max().item()
    assert 0 < err < 2e-2, err
    assert c8.k[3].dtype == torch.int8 and c8.k[0].dtype == torch.float32  # only the global layer
    exact = KVCache.for_model(model, 1, 64)
    assert c8.nbytes("global") < exact.nbytes("global") / 3


def test_int8_kv_ragged_batch_blocks():
    """Ragged rows + int8 blocks: a row whose keys all lie in later blocks must not break merging."""
    model, cfg = _model(False)
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, 500, (1, 3), generator=gen), torch.randint(0, 500, (1, 40), generator=gen)
    with torch.no_grad():
        cache = KVCache.for_model(model, 2, 64, kv_dtype="int8", block_size=8)
        model(a, cache=cache.select(0, 1))
        model(b, cache=cache.select(1, 1))
        x = torch.tensor([[7], [9]])
        out = model(x, cache=cache.select(0, 2))
        ref_a = model(torch.cat([a, x[:1]], 1))[:, -1]
        ref_b = model(torch.cat([b, x[1:]], 1))[:, -1]
    assert torch.isfinite(out).all()
    assert (out[0, -1] - ref_a[0]).abs().max() < 2e-2 and (out[1, -1] - ref_b[0]).abs().max() < 2e-2


def test_positions_must_continue_the_cache():
    model, _ = _model(False)
    cache = KVCache.for_model(model, 1, 32)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        with pytest.raises(ValueError, match="do not continue"):
            model(torch.tensor([[4]]), position_ids=torch.tensor([7]), cache=cache)


def test_copy_row_and_truncate():
    model, cfg = _model(False)
    ids = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = KVCache.for_model(model, 2, 64)
        model(ids[:, :30], cache=cache.select(0, 1))
        cache.copy_row(0, 1)
        out = model(ids[:, 30:31], cache=cache.select(1, 1))
        assert (out - model(ids[:, :31])[:, -1:]).abs().max().item() <= TOL
        # truncating inside the chunk that is still cached (positions 16..29 → keep 20) works ...
        assert cache.truncate(0, 20)
        out = model(ids[:, 20:22], cache=cache.select(0, 1))
        assert (out - model(ids[:, :22])[:, -2:]).abs().max().item() <= TOL
        # ... but not into a chunk the ring has already overwritten
        assert not cache.truncate(0, 5) and cache.lengths[0] == 22
