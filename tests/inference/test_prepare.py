"""The one way to get a model ready for inference (herd.inference.fast): herd.generate, herd.Engine
and Session prepare a trainable model themselves, on a separate object, bit-identical to the
explicit optimize_for_inference path; the trainable model is never touched; a prepared model
refuses training and saving in the checkpoint layout."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.inference import Engine, SamplingParams, Session, generate
from herd.inference.fast import InferenceLlama4, inference_view, optimize_for_inference
from herd.inference.quant import quantize_model, save_quantized
from herd.model import weights
from tests.conftest import model_config

TEXT = dict(intermediate_size=64, intermediate_size_mlp=128)
PROMPTS = [list(range(10, 30)), list(range(40, 47))]


def _model(dtype=torch.bfloat16, **over):
    return herd.build_model(model_config(vision=False, text={**TEXT, **over}), seed=1, dtype=dtype)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()],
            [p.requires_grad for p in model.parameters()], model.training)


def _details(model_or_engine_model, **kw):
    gens = generate(model_or_engine_model, PROMPTS, max_new_tokens=12, stop_token_ids=[], logprobs=2,
                    return_details=True, **kw)
    return [(g.tokens, g.logprobs, g.top_logprobs) for g in gens]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_on_a_trainable_model_runs_the_fast_path_and_leaves_the_model_alone(dtype):
    model = _model(dtype).train()  # as a trainer holds it
    before = _snapshot(model)
    engine = Engine(model)
    assert isinstance(engine.model, InferenceLlama4) and engine.decoder is not None  # batch-1 step held by the engine
    got = _details(model)
    want = _details(optimize_for_inference(model))  # the explicit fast path
    assert got == want  # tokens and log-probs bit for bit
    quantize_model(model, bits=8)  # builds its own inference model too
    state, classes, grads, training = _snapshot(model)
    assert classes == before[1] and grads == before[2] and training is True
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)


def test_the_prepared_copy_is_reused_until_the_weights_change():
    model = _model()
    view = inference_view(model)
    assert inference_view(model) is view and inference_view(view) is view
    engine = Engine(model)
    first = generate(model, PROMPTS[0], max_new_tokens=8, stop_token_ids=[])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(torch.tensor([PROMPTS[0]])).float().logsumexp(-1).mean().backward()
    opt.step()  # an optimizer step changes the weights in place
    assert inference_view(model) is not view
    again = generate(model, PROMPTS[0], max_new_tokens=8, stop_token_ids=[])
    assert again == generate(optimize_for_inference(model), PROMPTS[0], max_new_tokens=8, stop_token_ids=[])
    assert again != first
    with pytest.raises(ValueError, match="weights changed after this Engine was built"):
        engine.add(PROMPTS[0], SamplingParams(max_new_tokens=2))


def test_a_prepared_model_cannot_be_trained_or_saved_as_a_checkpoint(tmp_path):
    fast = optimize_for_inference(_model())
    assert optimize_for_inference(fast) is fast
    assert not any(p.requires_grad for p in fast.parameters())
    fast.eval()  # fine
    with pytest.raises(ValueError, match="prepared for inference"):
        fast.train()
    with pytest.raises(ValueError, match="not in the checkpoint layout"):
        herd.save_model(fast, tmp_path / "out")
    with pytest.raises(ValueError, match="already prepared"):
        quantize_model(fast)


def test_load_model_for_inference_and_quantized_directories(tmp_path):
    model = _model()
    herd.save_model(model, tmp_path / "m")
    plain = herd.load_model(tmp_path / "m", dtype=torch.bfloat16)
    fast = herd.load_model(tmp_path / "m", dtype=torch.bfloat16, for_inference=True)
    assert type(plain) is herd.Llama4 and isinstance(fast, InferenceLlama4)
    assert generate(fast, PROMPTS, max_new_tokens=8, stop_token_ids=[]) == generate(plain, PROMPTS, max_new_tokens=8,
                                                                                     stop_token_ids=[])
    save_quantized(quantize_model(model, bits=8), tmp_path / "q")
    assert isinstance(herd.load_model(tmp_path / "q"), InferenceLlama4)
    with pytest.raises(ValueError, match="quantized weights"):  # the model layer does not read them
        weights.load_model(tmp_path / "q")


def test_session_runs_the_same_fast_path():
    model = _model()
    s = Session(model)
    assert isinstance(s.model, InferenceLlama4) and s.decoder is not None
    reply = [e.token for e in s.generate(PROMPTS[0], SamplingParams(max_new_tokens=10, stop_token_ids=[]))]
    assert reply == generate(model, PROMPTS[0], max_new_tokens=10, stop_token_ids=[])[0]


def test_objects_that_are_not_herd_models_pass_through():
    class Mock(torch.nn.Module):
        pass

    m = Mock()
    assert inference_view(m) is m
