"""The batch-1 decode step (herd.inference.single), int8 activations, and loading a quantized
directory through herd.load_model."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

import herd
from herd.inference import generate
from herd.inference.cache import KVCache
from herd.inference.engine import forward_step
from herd.inference.fast import optimize_for_inference
from herd.inference.quant import (Int8Kernel, QuantLinear, int8_activations_available, load_quantized,
                                  quantize_model, save_quantized)
from herd.inference.single import SingleDecoder, native_glue_available
from tests.conftest import model_config

TEXT = dict(intermediate_size=64, intermediate_size_mlp=128)


def _model(dtype=torch.float32, **over):
    return herd.build_model(model_config(vision=False, text={**TEXT, **over}), seed=1, dtype=dtype).eval()


def _decode(model, ids, prompt: int, kv_dtype=None, decoder=None):
    """Logits [1, T - prompt + 1, vocab]: the prompt's last position, then one token at a time
    through engine.forward_step (the cache starts small, so it has to grow), with the batch-1 step
    `decoder` (None: the general forward for every step)."""
    cache = KVCache.for_model(model, 1, 8, kv_dtype=kv_dtype)
    with torch.inference_mode():
        out = [forward_step(model, ids[:, :prompt], cache, decoder=decoder)]
        out += [forward_step(model, ids[:, t:t + 1], cache, decoder=decoder) for t in range(prompt, ids.shape[1])]
    return torch.stack(out, 1).float()


NATIVE = [False] + ([True] if native_glue_available(torch.float32) else [])


def _same(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, native: bool) -> None:
    """The torch elementwise path repeats the general path's roundings exactly: equal logits. The
    native ops (herd.inference.native) round at the same places but sum in another order: equal to
    float32 rounding in float32; in bf16 an occasional one-ulp flip of a hidden value moves the logits
    by a few hundredths at most."""
    if not native:
        assert torch.equal(a, b)
    else:
        diff = (a - b).abs().max().item()
        assert diff <= (1e-5 if dtype == torch.float32 else 0.05), diff


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("over", [{}, dict(interleave_moe_layer_step=2), dict(use_qk_norm=False, attention_bias=True),
                                  dict(tie_word_embeddings=True)])
def test_single_step_equals_the_general_path_and_the_full_forward(dtype, over, native):
    model = _model(dtype, **over)
    ids = torch.randint(0, 500, (1, 44), generator=torch.Generator().manual_seed(3))  # crosses chunk 16 twice
    with torch.no_grad():
        full = model(ids).float()
    fast = optimize_for_inference(model)
    decoder = SingleDecoder(fast, native_glue=native)
    assert decoder.native == native
    calls = []
    single = _decode(fast, ids, 20, decoder=lambda tok, cache: calls.append(1) or decoder(tok, cache))
    assert len(calls) == 24  # every decode step took the batch-1 path
    _same(single, _decode(fast, ids, 20), dtype, native)  # same maths, same roundings as the general forward
    tol = 1e-4 if dtype == torch.float32 else 0.05
    assert (single[0, 1:] - full[0, 20:]).abs().max().item() <= tol


@pytest.mark.parametrize("native", NATIVE)
def test_single_step_with_int8_kv_cache_and_quantized_weights(native):
    model = _model(torch.bfloat16)
    ids = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(4))
    for bits in (8, 4):
        q = quantize_model(model, bits=bits, group_size=32)
        decoder = SingleDecoder(q, native_glue=native)
        for kv in (None, "int8"):
            _same(_decode(q, ids, 24, kv, decoder), _decode(q, ids, 24, kv), torch.bfloat16, native)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_step_routes_with_the_load_balancing_bias(dtype):
    """A model trained with aux-loss-free balancing has a non-zero expert_bias in its routing: the
    step adds it (cast once, when built) exactly as the general path does, and routes the same."""
    from herd.model.moe import MoE

    model = _model(dtype)
    g = torch.Generator().manual_seed(9)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert moes
    for m in moes:
        m.expert_bias.copy_(torch.randn(m.expert_bias.shape, generator=g) * 2)
    ids = torch.randint(0, 500, (1, 36), generator=torch.Generator().manual_seed(5))
    fast = optimize_for_inference(model)
    decoder = SingleDecoder(fast, native_glue=False)
    assert all(L["bias"] is not None for L in decoder.layers if L["experts"] is not None)
    assert torch.equal(_decode(fast, ids, 20, decoder=decoder), _decode(fast, ids, 20))


def test_top2_models_keep_the_general_path():
    fast = optimize_for_inference(_model(num_experts_per_tok=2))
    assert SingleDecoder.for_model(fast) is None
    ids = list(range(10, 30))
    assert len(generate(fast, ids, max_new_tokens=4, stop_token_ids=[])[0]) == 4


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: through herd's native ops
def test_compiled_single_step_stays_close(dtype):
    model = _model(dtype)
    ids = torch.randint(0, 500, (1, 26), generator=torch.Generator().manual_seed(5))
    fast = optimize_for_inference(model)
    got = _decode(fast, ids, 22, decoder=SingleDecoder(fast, compile=True))
    want = _decode(fast, ids, 22, decoder=SingleDecoder(fast))
    tol = 1e-3 if dtype == torch.float32 else 0.02 * want.abs().max().item()
    assert (got - want).abs().max().item() < tol


@pytest.mark.skipif(not int8_activations_available(), reason="needs fbgemm's dynamic int8 linear")
def test_int8_activations_stay_close_and_round_trip(tmp_path):
    model = _model(torch.bfloat16)
    ids = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids).float()
    wo = quantize_model(model, bits=8)
    a8 = quantize_model(model, bits=8, activations="int8")
    assert a8.language_model.lm_head.kernel.packed is not None and wo.language_model.lm_head.kernel.packed is None
    got, weight_only = _decode(a8, ids, 20, decoder=SingleDecoder(a8)), _decode(wo, ids, 20, decoder=SingleDecoder(wo))
    cos = F.cosine_similarity(got[0, 1:].flatten(), full[0, 20:].flatten(), dim=0).item()
    assert cos > 0.999, cos
    assert not torch.equal(got, weight_only)  # activations really are quantized
    # the kernel alone: per-row int8 activations, within ~1% of the dequantized product
    torch.manual_seed(0)
    lin = QuantLinear.from_linear(torch.nn.Linear(256, 96, bias=False), bits=8)
    x = torch.randn(3, 256)
    ref = F.linear(x, lin.kernel.dequantize())
    assert isinstance(lin.kernel, Int8Kernel)
    lin.kernel.set_activations(True)
    assert ((lin(x) - ref).norm() / ref.norm()).item() < 0.02
    save_quantized(a8, tmp_path)
    back = load_quantized(tmp_path)
    assert back.quantization_config["activations"] == "int8"
    assert torch.equal(_decode(back, ids, 20, decoder=SingleDecoder(back)), got)
    with pytest.raises(ValueError, match="activations"):
        quantize_model(model, bits=4, activations="int8")


def test_load_model_reads_a_quantized_directory(tmp_path):
    model = _model(torch.bfloat16)
    q = quantize_model(model, bits=8)
    save_quantized(q, tmp_path)
    back = herd.load_model(tmp_path, dtype=torch.bfloat16)
    assert isinstance(back.language_model.lm_head, QuantLinear) and back.dtype == torch.bfloat16
    p = list(range(10, 30))
    assert generate(back, p, max_new_tokens=8, stop_token_ids=[]) == generate(q, p, max_new_tokens=8,
                                                                              stop_token_ids=[])
    assert herd.load_model(str(tmp_path)).dtype == torch.float32  # dtype as for any directory
