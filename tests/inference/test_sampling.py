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
    for p in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
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
