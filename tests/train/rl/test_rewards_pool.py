"""Rewards (TRL's calling convention, failures → None and counted) and the prompt pool's states."""

from __future__ import annotations

import warnings

import pytest

from herd.train.rl.pool import PromptPool
from herd.train.rl.rewards import correctness, format_reward, score


def test_rewards_follow_trl_convention():
    out = correctness(prompts=["4 - 1 =", "2 + 2 ="], completions=["3", "the answer is 5"],
                      verifier=["last_number", "last_number"], answer=["3", "4"])
    assert out == [1.0, 0.0]
    assert correctness(prompts=["hi"], completions=["hello"], verifier=[None], answer=[None]) == [None]
    assert format_reward(completions=["3", "", "a\n\nb", "x<|eot|>"]) == [1.0, 0.0, 0.0, 0.0]


def test_a_raising_reward_scores_none_for_that_sample_only():
    def picky(prompts, completions, **_):
        return [1.0 / (len(c) - 1) for c in completions]  # raises ZeroDivisionError on 1-char completions

    totals, per_fn, errors = score({"picky": picky, "format": format_reward}, {"picky": 1.0, "format": 0.5},
                                   ["p"] * 3, ["ab", "a", "abc"], {})
    assert per_fn["picky"] == [1.0, None, 0.5] and errors == 1
    assert totals == [1.5, 0.5, 1.0]  # the failing function is skipped for that sample, the other counts
    totals, _, errors = score({"picky": picky}, {}, ["p"], ["a"], {})
    assert totals == [None] and errors == 1  # no function applies: the sample is left out of its group


def test_pool_moves_prompts_between_states():
    pool = PromptPool(5, tau=0.75, window=2, cooldown=2, seed=0)
    assert pool.counts()["new"] == 5
    assert pool.update(0, [True] * 4) == "solved"            # always solved → retired
    assert pool.update(1, [True, True, True, False]) == "hard"  # 0.75 ≤ τ
    assert pool.update(2, [False] * 4) == "unsolved"
    assert pool.update(3, [True, False, False, False]) == "hard"
    assert pool.update(3, [True] * 4) == "hard"              # window mean 0.625: still hard
    assert pool.update(3, [True] * 4) == "solved"            # window mean 1: retired
    assert pool.update(3, [False] * 4) == "solved"           # retirement is final
    assert pool.update(2, [True, False, False, False]) == "hard"  # window (0, 0.25) → 0.125: back to hard
    assert pool.update(4, [True, True, True, True, True, True, True, False]) == "easy"  # 0.875 > τ
    assert pool.counts() == {"new": 0, "hard": 2, "unsolved": 0, "easy": 1, "solved": 2}
    for _ in range(20):
        assert set(pool.draw(5)) <= {1, 2}                   # retired prompts are never drawn


def test_unsolved_prompts_rest_then_return_at_lower_weight():
    pool = PromptPool(200, tau=0.75, cooldown=3, unsolved_weight=0.25, seed=1)
    for i in range(100):
        pool.update(i, [False] * 4)                          # 0..99 unsolved, resting until draw 3
    for i in range(100, 200):
        pool.update(i, [True, False])                        # 100..199 hard
    for _ in range(3):
        assert all(i >= 100 for i in pool.draw(50))          # resting: not drawn
    counts = [0, 0]
    for _ in range(200):
        for i in pool.draw(20):
            counts[i >= 100] += 1
    ratio = counts[0] / counts[1]
    assert 0.1 < ratio < 0.45                                # weight 0.25 against 1 (sampling w/o replacement)


def test_running_out_returns_a_smaller_batch_never_raises():
    pool = PromptPool(3, seed=0)
    pool.update(0, [True, True])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # the pool itself is silent; the learner warns
        assert sorted(pool.draw(8)) == [1, 2]
    pool.update(1, [True, True])
    pool.update(2, [True, True])
    assert pool.draw(8) == []
    p2 = PromptPool(3, cooldown=100)
    p2.update(0, [False])
    p2.update(1, [True])
    p2.update(2, [True])
    assert p2.draw(2) == [0]                                 # nothing else eligible: a resting prompt early


def test_pool_state_round_trips():
    a = PromptPool(10, seed=3)
    a.update(1, [True, False])
    a.update(2, [False, False])
    a.draw(4)
    b = PromptPool(10, seed=99)
    b.load_state_dict(a.state_dict())
    assert b.draw(4) == a.draw(4) and b.counts() == a.counts()
    with pytest.raises(ValueError, match="same --tasks"):
        PromptPool(11).load_state_dict(a.state_dict())


def test_correctness_is_pass_fail_on_reasoning_gym_tasks():
    from herd.data.chat_data import reasoning_gym_examples

    ex = reasoning_gym_examples("chain_sum", 3, seed=0)[0]
    cols = {"verifier": [ex["verifier"]] * 3, "answer": [ex["answer"]] * 3, "entry": [ex["entry"]] * 3}
    wrong = str(int(ex["answer"]) + 1)
    assert correctness(prompts=["q"] * 3, completions=[ex["answer"], wrong, "no idea"], **cols) == [1.0, 0.0, 0.0]
