"""Weight-only int8/int4 quantization and the decode fast paths."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import herd
from herd.inference import generate
from herd.inference.cache import KVCache
from herd.inference.fast import FastLinear, FastMoE, KernelExperts, optimize_for_inference
from herd.inference.quant import (QuantExperts, QuantLinear, load_quantized, quantize_model, save_quantized)
from tests.conftest import model_config
from tests.greedy import assert_greedy_under

# int4 needs every input width divisible by the group size (32 here)
TEXT = dict(intermediate_size=64, intermediate_size_mlp=128)


def _model(dtype=torch.float32, vision=False, **over):
    cfg = model_config(vision=vision, text={**TEXT, **over})
    return herd.build_model(cfg, seed=1, dtype=dtype).eval()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 40])  # fused kernel (few rows) and dequantize + GEMM (many)
def test_quant_linear_equals_its_dequantized_weight(bits, rows):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 80, bias=True)
    q = QuantLinear.from_linear(lin, bits=bits, group_size=32)
    x = torch.randn(rows, 96)
    w = q.kernel.dequantize()
    assert (q(x) - F.linear(x, w, lin.bias)).abs().max().item() < 1e-4
    rel = ((w - lin.weight).norm() / lin.weight.norm()).item()
    assert rel < (0.01 if bits == 8 else 0.12), rel
    assert rel > 1e-4  # it is really quantized
    assert q.qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)


@pytest.mark.parametrize("bits", [8, 4])
def test_many_rows_use_blocks_of_dequantized_weight(bits, monkeypatch):
    from herd.inference import quant

    monkeypatch.setattr(quant, "BLOCK_BYTES", 1)  # blocks of 256 output rows
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 1000, bias=False)
    q = QuantLinear.from_linear(lin, bits=bits, group_size=32)
    x = torch.randn(2, 20, 64)
    assert (q(x) - F.linear(x, q.kernel.dequantize())).abs().max().item() < 1e-4


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_tracks_the_original_and_round_trips(bits, tmp_path):
    model = _model()
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
        q = quantize_model(copy.deepcopy(model), bits=bits, group_size=32)
        out = q(ids)
    assert any(isinstance(m, QuantExperts) for m in q.modules())
    assert isinstance(q.language_model.lm_head, QuantLinear)
    cos = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    assert cos > (0.999 if bits == 8 else 0.98), cos
    save_quantized(q, tmp_path)
    back = load_quantized(tmp_path)
    with torch.no_grad():
        assert torch.equal(back(ids), out)
    # incremental decode through the cache works on the quantized model too
    with torch.no_grad():
        cache = KVCache.for_model(back, 1, 64)
        first = back(ids[:1, :30], cache=cache)
        inc = torch.cat([first] + [back(ids[:1, t:t + 1], cache=cache) for t in range(30, 40)], 1)
    assert (inc - out[:1]).abs().max().item() < 1e-4


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_directory_keeps_the_moe_expert_bias(bits, tmp_path):
    """A non-zero load-balancing bias (herd-only, herd/model/moe.py) survives save → load:
    the loaded model routes every token to the same experts and gives the same logits as the
    model quantized in memory — and the bias really moves the routing here."""
    from herd.model.moe import MoE, expert_biases

    model = _model()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    g = torch.Generator().manual_seed(3)
    for m in moes:
        m.expert_bias.copy_(torch.randn(m.num_experts, generator=g) * 5)
    ids = torch.randint(0, 500, (1, 24), generator=torch.Generator().manual_seed(2))

    def counts(mdl):
        return [m.last_counts.clone() for m in mdl.modules() if isinstance(m, MoE)]

    with torch.no_grad():
        q = quantize_model(copy.deepcopy(model), bits=bits, group_size=32)
        out, routed = q(ids), counts(q)
        save_quantized(q, tmp_path)
        back = load_quantized(tmp_path)
        assert torch.equal(back(ids), out)
        assert all(torch.equal(a, b) for a, b in zip(counts(back), routed))
        saved = expert_biases(back)
        assert len(saved) == len(moes) and all(torch.equal(saved[k], v) for k, v in expert_biases(q).items())
        # token by token (FastMoE's one-token path) routes the same way too
        cache = KVCache.for_model(back, 1, 32)
        first = back(ids[:, :20], cache=cache)
        inc = torch.cat([first] + [back(ids[:, t:t + 1], cache=cache) for t in range(20, 24)], 1)
        assert (inc - out).abs().max().item() < 1e-4
        # the bias matters: without it the same weights route (and score) differently
        plain = copy.deepcopy(model)
        for m in plain.modules():
            if isinstance(m, MoE):
                m.expert_bias.zero_()
        qp = quantize_model(plain, bits=bits, group_size=32)
        assert not torch.equal(qp(ids), out)
        assert any(not torch.equal(a, b) for a, b in zip(counts(qp), routed))


def test_quantized_multimodal_bf16_generates(tmp_path):
    model = _model(torch.bfloat16, vision=True, tie_word_embeddings=True)
    q = quantize_model(copy.deepcopy(model), bits=8)
    save_quantized(q, tmp_path)
    back = load_quantized(tmp_path)
    assert back.dtype == torch.bfloat16 and back.vision_model is not None
    p = list(range(10, 30))
    assert generate(back, p, max_new_tokens=8, stop_token_ids=[]) == generate(q, p, max_new_tokens=8, stop_token_ids=[])
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(copy.deepcopy(model), bits=4, group_size=48)


@pytest.mark.parametrize("dtype,over", [(torch.float32, {}), (torch.bfloat16, {}),
                                        (torch.float32, dict(interleave_moe_layer_step=2, num_experts_per_tok=2))])
def test_optimize_for_inference_keeps_the_logits(dtype, over):
    model = _model(dtype, **over)
    ids = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(2))
    moe = 1 if over else 0  # first MoE layer
    with torch.no_grad():
        ref = model(ids).float()
        fast = optimize_for_inference(copy.deepcopy(model))
        assert isinstance(fast.layers[moe].feed_forward, FastMoE)
        assert isinstance(fast.layers[moe].feed_forward.experts, KernelExperts)
        assert isinstance(fast.layers[0].self_attn.qkv_proj, FastLinear)
        assert isinstance(fast.layers[moe].feed_forward.shared_expert.gate_up, FastLinear)
        got = fast(ids).float()
        cache = KVCache.for_model(fast, 1, 64)
        first = fast(ids[:, :20], cache=cache)
        inc = torch.cat([first] + [fast(ids[:, t:t + 1], cache=cache) for t in range(20, 40)], 1)
    tol = 1e-4 if dtype == torch.float32 else 0.05
    assert (got - ref).abs().max().item() <= tol
    assert (inc.float() - ref).abs().max().item() <= tol
    # the fast path decodes greedily under the plain model's logits (to the same tolerance: in bf16 a
    # near-tie may go the other way, tests/greedy.py)
    tokens = generate(fast, ids, max_new_tokens=10, stop_token_ids=[])[0]
    assert_greedy_under(model, ids[0].tolist(), tokens, tol)
