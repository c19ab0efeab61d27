"""iRoPE attention pieces against float64 references with explicit masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from herd.model import attention as A
from herd.model.rope import apply_rope, rope_angles, text_inv_freq, vision_rope_angles


def masked_reference(q, k, v, allowed):
    """Plain softmax attention in float64 with a boolean [T, T] mask (True = may attend); GQA by repeat."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("T,chunk,start", [(50, 16, 0), (16, 16, 0), (7, 16, 0), (50, 16, 5), (40, 8, 13),
                                           (33, 16, 31), (64, 64, 0)])
def test_chunked_causal_attention_matches_mask_reference(T, chunk, start):
    g = torch.Generator().manual_seed(T + chunk + start)
    q = torch.randn(2, 4, T, 8, generator=g)
    k, v = torch.randn(2, 2, T, 8, generator=g), torch.randn(2, 2, T, 8, generator=g)
    pos = torch.arange(start, start + T)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] // chunk == pos[:, None] // chunk)
    out = A.chunked_causal_attention(q, k, v, chunk, start)
    torch.testing.assert_close(out.double(), masked_reference(q, k, v, allowed), atol=1e-5, rtol=1e-5)


def test_no_quadratic_mask_and_chunk_sized_blocks(monkeypatch):
    """Chunked layers only ever call SDPA on ≤ chunk keys, and never with an explicit mask."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((k.shape[-2], attn_mask))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", spy)
    q = torch.randn(1, 2, 1000, 8)
    A.chunked_causal_attention(q, q[:, :1], q[:, :1], 64, 10)
    assert seen and all(n <= 64 and m is None for n, m in seen)


def test_temperature_scale_formula():
    pos = torch.tensor([0, 6, 7, 8, 100, 8191, 8192, 10**6])
    expect = [math.log(math.floor((p + 1) / 8) + 1) * 0.1 + 1 for p in pos.tolist()]
    torch.testing.assert_close(A.temperature_scale(pos, 8, 0.1), torch.tensor(expect, dtype=torch.float32))
    assert A.temperature_scale(torch.tensor([8190]), 8192, 0.1).item() == 1.0  # off until floor_scale


def test_l2_norm_is_unit_rms():
    x = torch.randn(3, 5, 16) * 7
    y = A.l2_norm(x, 1e-6)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3, 5), atol=1e-4, rtol=1e-4)


def test_rope_is_complex_rotation_of_interleaved_pairs():
    x = torch.randn(2, 9, 3, 16)
    pos = torch.arange(9) + 4
    inv = text_inv_freq(16, 10000.0)
    cos, sin = rope_angles(pos, inv)
    z = torch.view_as_complex(x.double().reshape(2, 9, 3, 8, 2))
    rot = torch.polar(torch.ones(9, 8, dtype=torch.float64), pos[:, None].double() * inv.double())
    ref = torch.view_as_real(z * rot[None, :, None, :]).flatten(-2)
    torch.testing.assert_close(apply_rope(x, cos, sin).double(), ref, atol=1e-5, rtol=1e-5)


def test_llama3_scaling_matches_transformers():
    from transformers import Llama4TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = Llama4TextConfig(head_dim=128, rope_parameters={"rope_theta": 500000.0, **scaling})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    ours = text_inv_freq(128, 500000.0, scaling)
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, text_inv_freq(128, 500000.0))  # scaling does something


def test_vision_rope_matches_transformers():
    from transformers import Llama4VisionConfig
    from transformers.models.llama4.modeling_llama4 import Llama4VisionRotaryEmbedding

    cfg = Llama4VisionConfig(image_size=56, patch_size=7, hidden_size=64, num_attention_heads=2,
                             rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    theirs = Llama4VisionRotaryEmbedding._compute_freqs_ci(cfg)  # complex [P²+1, 1, D/2]
    cos, sin = vision_rope_angles(8, 32, 10000.0)
    torch.testing.assert_close(cos, theirs.real.reshape(cos.shape))
    torch.testing.assert_close(sin, theirs.imag.reshape(sin.shape))


@pytest.mark.parametrize("chunk,start", [(None, 0), (16, 0), (8, 5)])
def test_document_attention_matches_mask_reference(chunk, start):
    g = torch.Generator().manual_seed(7)
    T = 40
    q = torch.randn(2, 4, T, 8, generator=g)
    k, v = torch.randn(2, 2, T, 8, generator=g), torch.randn(2, 2, T, 8, generator=g)
    doc = torch.tensor([[0] * 10 + [1] * 25 + [2] * 5, [0] * 40])
    pos = torch.arange(start, start + T)
    for b in range(2):
        allowed = (pos[None, :] <= pos[:, None]) & (doc[b][None, :] == doc[b][:, None])
        if chunk:
            allowed &= pos[None, :] // chunk == pos[:, None] // chunk
        out = A.document_causal_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], doc[b:b + 1], chunk, start)
        ref = masked_reference(q[b:b + 1], k[b:b + 1], v[b:b + 1], allowed)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_packed_documents_see_only_themselves():
    """With document ids, a packed row gives each document the logits it gets alone (RoPE is
    relative; no chunk boundary or temperature tuning in the way)."""
    import herd
    from tests.conftest import model_config

    cfg = model_config(vision=False, text=dict(attention_chunk_size=None, attn_temperature_tuning=False))
    model = herd.build_model(cfg, seed=0).eval()
    a, b = torch.randint(0, 400, (1, 9)), torch.randint(0, 400, (1, 14))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 9 + [1] * 14])
    with torch.no_grad():
        out = model(packed, document_ids=doc_ids)
        torch.testing.assert_close(out[:, :9], model(a), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out[:, 9:], model(b), atol=1e-4, rtol=1e-4)
        assert (model(packed)[:, 9:] - model(b)).abs().max() > 1e-3  # without ids, b sees a
    with pytest.raises(ValueError, match="document_ids"):
        model(packed, document_ids=doc_ids[:, :5])


def test_short_input_inside_one_chunk_is_not_padded_to_the_chunk(monkeypatch):
    """A row shorter than the chunk (DPO pairs, short SFT rows at position 0) runs SDPA on its own T keys."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(k.shape[-2])
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", spy)
    q = torch.randn(1, 2, 60, 8)
    A.chunked_causal_attention(q, q, q, 256, 0)
    assert seen == [60]
