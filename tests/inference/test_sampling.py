"""Sampling rules on hand-made logits, and streaming detokenization."""

from __future__ import annotations

import math

import pytest
import torch

from herd.inference.sampling import RowState, SamplingParams, sample
from herd.inference.text import TextStream

V = 8
LOGITS = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])  # probabilities fall with the index


def _draws(params: SamplingParams, n: int = 3000, logits=LOGITS) -> torch.Tensor:
    row = RowState(params, V)
    return torch.tensor([sample(logits, [row]).tokens[0] for _ in range(n)])


def test_greedy_and_degenerate_filters_pick_the_argmax():
    assert sample(LOGITS, [RowState(SamplingParams(), V)]).tokens == [0]
    for p in (dict(top_k=1), dict(top_p=1e-6), dict(top_p=5e-324), dict(min_p=1.0)):
        assert set(_draws(SamplingParams(temperature=1.0, seed=0, **p), 200).tolist()) == {0}


def test_temperature_sampling_follows_the_softmax():
    for temp in (1.0, 0.5):
        d = _draws(SamplingParams(temperature=temp, seed=1), 6000)
        freq = torch.bincount(d, minlength=V).float() / len(d)
        want = torch.softmax(LOGITS[0] / temp, -1)
        assert (freq - want).abs().max() < 0.025, (temp, freq, want)


def test_top_k_top_p_min_p_restrict_the_support():
    probs = torch.softmax(LOGITS[0], -1)
    assert set(_draws(SamplingParams(temperature=1.0, top_k=3, seed=2)).tolist()) == {0, 1, 2}
    # nucleus: the smallest set of top tokens whose mass reaches top_p
    top_p = float(probs[:3].sum()) - 0.01
    assert set(_draws(SamplingParams(temperature=1.0, top_p=top_p, seed=3)).tolist()) == {0, 1, 2}
    # min-p: keep tokens with p ≥ min_p · p_max
    min_p = float(probs[3] / probs[0]) - 1e-3
    assert set(_draws(SamplingParams(temperature=1.0, min_p=min_p, seed=4)).tolist()) == {0, 1, 2, 3}


def test_penalties_subtract_counts():
    row = RowState(SamplingParams(frequency_penalty=0.3), V)
    for t in (0, 0):
        row.observe(t)
    assert sample(LOGITS, [row]).tokens == [1]  # 2.0 − 2·0.3 = 1.4 < 1.5
    row = RowState(SamplingParams(presence_penalty=0.45), V)
    for t in (0, 0, 0):
        row.observe(t)
    assert sample(LOGITS, [row]).tokens == [0]  # presence counts once: 2.0 − 0.45 = 1.55 > 1.5
    row.params.presence_penalty = 0.55
    assert sample(LOGITS, [row]).tokens == [1]


def test_seeds_reproduce_and_rows_are_independent():
    a = _draws(SamplingParams(temperature=1.0, seed=5), 50)
    b = _draws(SamplingParams(temperature=1.0, seed=5), 50)
    c = _draws(SamplingParams(temperature=1.0, seed=6), 50)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a row samples the same tokens next to other rows with other settings
    rows = [RowState(SamplingParams(temperature=1.0, seed=5), V), RowState(SamplingParams(), V),
            RowState(SamplingParams(temperature=0.3, top_k=2, seed=9), V)]
    batch = torch.cat([LOGITS, LOGITS.flip(-1), LOGITS])
    got = [sample(batch, rows).tokens for _ in range(50)]
    assert [g[0] for g in got] == a.tolist()
    assert all(g[1] == V - 1 for g in got) and all(g[2] in (0, 1) for g in got)


def test_logprobs_and_top_alternatives():
    out = sample(LOGITS, [RowState(SamplingParams(logprobs=2), V)])
    lp = torch.log_softmax(LOGITS[0], -1)
    assert math.isclose(out.logprobs[0], lp[0].item(), abs_tol=1e-6)
    assert [i for i, _ in out.top_logprobs[0]] == [0, 1]
    assert sample(LOGITS, [RowState(SamplingParams(), V)]).logprobs == [None]


def test_invalid_params():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2), dict(top_k=-1),
                dict(max_new_tokens=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


class ByteTok:
    def __init__(self, table):
        self.table = table

    def decode_bytes(self, ids):
        return b"".join(self.table[i] for i in ids)


def test_text_stream_splits_utf8_and_holds_back_stop_prefixes():
    tok = ByteTok({0: b"ab", 1: b"\xc3", 2: b"\xa9", 3: b"<", 4: b"/s", 5: b">", 6: b"x"})
    s = TextStream(tok, stop=["</s>"])
    assert s.push(0) == "ab"
    assert s.push(1) == ""  # half of 'é'
    assert s.push(2) == "é"
    assert s.push(3) == ""  # could start "</s>"
    assert s.push(6) == "<x"  # it did not
    assert s.push(3) == "" and s.push(4) == ""
    assert s.push(5) == "" and s.stopped  # "</s>" found: nothing of it is shown
    assert s.text == "abé<x" and s.push(0) == ""
    s = TextStream(tok, stop=["</s>"])
    s.push(0), s.push(3)
    assert s.finish() == "<"  # held-back text comes out at the end


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    from herd.inference.sampling import adjusted_logits

    row = RowState(SamplingParams(repetition_penalty=2.0), V, prompt=[0, 6, 6])
    row.observe(5)
    # by hand: tokens 0, 5, 6 seen; 2.0/2, −0.5·2, −1.0·2; the others unchanged
    want = torch.tensor([[1.0, 1.5, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0]])
    assert torch.equal(adjusted_logits(LOGITS, [row]), want)
    assert sample(LOGITS, [row]).tokens == [1]  # the seen argmax lost its lead
    # independent oracle: transformers' processor over prompt + output ids
    from transformers import RepetitionPenaltyLogitsProcessor

    x = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    seen = [3, 7, 7, 12, 40, 49]
    row = RowState(SamplingParams(repetition_penalty=1.3), 50, prompt=seen[:4])
    for t in seen[4:]:
        row.observe(t)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), x.clone())
    assert torch.allclose(adjusted_logits(x, [row]), ref, atol=1e-6)
    # penalty < 1 encourages repetition; 1 leaves the logits as they are
    assert sample(LOGITS, [RowState(SamplingParams(repetition_penalty=0.1), V, prompt=[3])]).tokens == [3]
    assert adjusted_logits(LOGITS, [RowState(SamplingParams(), V, prompt=[0])]) is LOGITS


def test_repetition_penalty_comes_before_frequency_and_presence():
    from herd.inference.sampling import adjusted_logits

    row = RowState(SamplingParams(repetition_penalty=4.0, frequency_penalty=0.25, presence_penalty=0.5), V,
                   prompt=[1])
    row.observe(0), row.observe(0)
    # token 0: 2.0/4 − 2·0.25 − 0.5 = −0.5; token 1 (prompt only): 1.5/4 = 0.375
    want = LOGITS.clone()
    want[0, 0], want[0, 1] = -0.5, 0.375
    assert torch.allclose(adjusted_logits(LOGITS, [row]), want)


def test_min_tokens_masks_stop_tokens_until_reached():
    row = RowState(SamplingParams(min_tokens=2, stop_token_ids=[0, 2]), V)
    picked = []
    for _ in range(3):
        t = sample(LOGITS, [row]).tokens[0]
        picked.append(t)
        row.observe(t)
    assert picked == [1, 1, 0]  # 0 and 2 are forbidden for the first two tokens
    # sampled rows never draw a masked stop id; rows without min_tokens in the same batch are untouched
    hot = RowState(SamplingParams(temperature=1.0, min_tokens=5, seed=0), V, stop_ids=[0, 1])
    other = RowState(SamplingParams(), V)
    draws = [sample(torch.cat([LOGITS, LOGITS]), [hot, other]).tokens for _ in range(300)]
    assert all(d[0] not in (0, 1) for d in draws) and all(d[1] == 0 for d in draws)
    # the engine's stop ids (the model's eos when stop_token_ids is None) are the ones masked
    from herd.inference.sampling import adjusted_logits

    eos_row = RowState(SamplingParams(min_tokens=1), V, stop_ids={7, 3, 99})  # 99: outside the vocab, ignored
    x = adjusted_logits(LOGITS, [eos_row])
    assert torch.isinf(x[0, [3, 7]]).all() and torch.isfinite(x[0, [0, 1, 2, 4, 5, 6]]).all()
    eos_row.observe(5)
    assert adjusted_logits(LOGITS, [eos_row]) is LOGITS


def test_new_params_are_validated():
    for bad in (dict(repetition_penalty=0), dict(repetition_penalty=-1.0), dict(repetition_penalty=5e-324),
                dict(repetition_penalty=1e6), dict(min_tokens=-1),
                dict(min_tokens=10, max_new_tokens=5), dict(min_tokens=1.5)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_engine_applies_min_tokens_and_repetition_penalty_to_prompt_tokens():
    import herd
    from herd.inference import generate
    from tests.conftest import model_config

    model = herd.build_model(model_config(), seed=1, dtype=torch.float32).eval()
    prompt = list(range(10, 30))
    first = generate(model, prompt, max_new_tokens=6, stop_token_ids=[])[0][0]
    # the first greedy token made a stop token: alone it ends at once, with min_tokens=4 not before 5 tokens
    assert generate(model, prompt, max_new_tokens=6, stop_token_ids=[first]) == [[first]]
    held = generate(model, prompt, max_new_tokens=6, stop_token_ids=[first], min_tokens=4)[0]
    assert len(held) >= 5 and first not in held[:4]
    # repetition_penalty counts the prompt's tokens: the engine's first token is the argmax of the
    # model's last logits after transformers' processor over the prompt
    from transformers import RepetitionPenaltyLogitsProcessor

    ids = torch.tensor([[first] + prompt])
    with torch.no_grad():
        last = model(ids)[:, -1].float()
    for penalty in (1.0, 3.0, 100.0):
        want = RepetitionPenaltyLogitsProcessor(penalty)(ids, last.clone()).argmax(-1).item()
        got = generate(model, ids[0].tolist(), max_new_tokens=1, stop_token_ids=[], repetition_penalty=penalty)
        assert got == [[want]], penalty
    top = last.argmax().item()
    assert top == first and want != top  # the prompt's token was the argmax; the penalty moved the pick
