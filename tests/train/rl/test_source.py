"""The learner's batch source on a scripted rollout backend: zero-advantage groups dropped and
refilled, the staleness bound, short batches, constant-reward detection, resumable state."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from herd.train.rl.actor import Completion, Rollout, StalenessBuffer
from herd.train.rl.learner import ConstantRewardError, GRPOObjective, RLConfig, RolloutSource


class Scripted:
    """A backend whose completions are scripted per prompt: `outcomes[i]` is the list of texts a
    group of prompt i gets; `lag` makes every rollout that many versions older than the newest."""

    def __init__(self, outcomes, lag=0):
        self.outcomes, self.lag = outcomes, lag
        self.version, self.queue, self.submitted, self.published = 0, [], [], []

    def publish(self, state, version):
        self.version = version
        self.published.append(version)

    def submit(self, i, ids, n, pixel_values=None):
        self.submitted.append(i)
        texts = self.outcomes[i][:n]
        comps = [Completion([7, 8, 9][: 1 + k % 3], [-0.5] * (1 + k % 3), t, "stop") for k, t in enumerate(texts)]
        self.queue.append(Rollout(i, list(ids), comps, max(0, self.version - self.lag)))

    def in_flight(self):
        return len(self.queue)

    def ready(self):
        out, self.queue = self.queue, []
        return out

    def close(self):
        pass


def make_source(outcomes, lag=0, **kw):
    cfg = RLConfig(init="x", group_size=4, prompts_per_step=2, progress=False, rewards="correctness:1", **kw)
    items = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "1"}],
              "verifier": "exact", "answer": "1"} for i in range(len(outcomes))]
    model = types.SimpleNamespace(config=types.SimpleNamespace(vision=None), state_dict=lambda: {})
    src = RolloutSource(cfg, model, None, items, Scripted(outcomes, lag), pad_id=0)
    src._ids = {i: [1, 2, 3] for i in range(len(items))}
    return src


MIXED, ALL, NONE = ["1", "0", "1", "0"], ["1"] * 4, ["0"] * 4


def test_zero_advantage_groups_are_dropped_and_refilled():
    src = make_source([ALL, NONE, MIXED, ALL, MIXED, NONE], max_staleness=0, refill_rounds=10)
    batch = next(src)
    st = batch.stats
    assert st["groups/kept"] == 2                                  # refilled up to prompts_per_step
    assert st["groups/zero_adv_dropped"] >= 1
    assert batch.advantages.shape == (8,) and (batch.advantages != 0).all()
    assert st["frac_reward_zero_std"] == st["groups/zero_adv_dropped"] / (st["groups/zero_adv_dropped"] + 2)
    kept_prompts = {i for i in (2, 4)}
    assert kept_prompts <= set(src.backend.submitted)
    # pool: solved/unsolved prompts left the batch-eligible states
    assert src.pool.state[2] == src.pool.state[4] == "hard"
    assert {src.pool.state[i] for i in (0, 3)} <= {"solved", "new"}


def test_running_out_is_a_warning_and_a_smaller_batch():
    src = make_source([MIXED, ALL, ALL, NONE], max_staleness=0, refill_rounds=3)
    src.cfg.prompts_per_step = 3
    with pytest.warns(RuntimeWarning, match="only 1 of 3 groups"):
        batch = next(src)
    assert batch.stats["groups/kept"] == 1 and batch.input_ids.shape[0] == 4


def test_constant_reward_stops_with_a_clear_error():
    src = make_source([ALL] * 40, max_staleness=0, constant_steps=3, uniform=True)
    with pytest.warns(RuntimeWarning):
        b = next(src)
        assert b.input_ids.shape[0] == 0 and b.stats["frac_reward_zero_std"] == 1.0
        next(src)
        with pytest.raises(ConstantRewardError, match="constant for 3 consecutive steps.*frac_reward_zero_std = 1"):
            next(src)


def test_empty_batch_gives_a_zero_loss_that_reaches_the_parameters():
    src = make_source([ALL] * 4, max_staleness=0, constant_steps=10)
    with pytest.warns(RuntimeWarning):
        batch = next(src)
    model = torch.nn.Linear(2, 2)
    loss, n, _ = GRPOObjective(src.cfg)(model, batch)
    loss.backward()
    assert n == 0 and float(loss.detach()) == 0 and (model.weight.grad == 0).all()


@pytest.mark.parametrize("k,lag", [(0, 1), (1, 2), (2, 2)])
def test_staleness_bound_holds(k, lag):
    src = make_source([MIXED] * 40, lag=lag, max_staleness=k, refill_rounds=2, constant_steps=100)
    for step in range(4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batch = next(src)
        assert batch.stats["staleness/max"] <= k                   # nothing older than K reaches the loss
        if min(step, lag) > k:                                    # every rollout comes back too old
            assert batch.stats["groups/kept"] == 0 and batch.stats["samples/stale_dropped"] > 0
        else:
            assert batch.stats["groups/kept"] == 2 and batch.stats["staleness/max"] == min(step, lag)
    assert src.backend.published == [0, 1, 2, 3]  # weights published once per learner step


def test_buffer_rechecks_staleness_on_the_way_out():
    buf = StalenessBuffer(max_staleness=1, capacity=4)
    r = Rollout(0, [1], [Completion([2], [-1.0], "x", "stop")] * 3, version=5)
    assert buf.put(r, learner_version=6)
    assert not buf.put(Rollout(1, [1], r.completions, version=4), learner_version=6) and buf.dropped_stale == 3
    assert buf.take(learner_version=7) is None and buf.dropped_stale == 6  # aged while waiting
    with pytest.raises(ValueError):
        StalenessBuffer(-1, 1)


def test_source_state_round_trips():
    a = make_source([MIXED] * 10, max_staleness=0)
    next(a)
    next(a)
    b = make_source([MIXED] * 10, max_staleness=0)
    b.load_state_dict(a.state_dict())
    assert b.step == 2 and b.pool.state_dict() == a.pool.state_dict()
    assert b.backend.published == [] and (next(b), b.backend.published)[1] == [2]  # resumes publishing its version


def test_frac_reward_zero_std_counts_equal_groups_whose_float32_std_is_not_zero():
    """[1.2] * 8 has a float32 std of ~1e-7, not 0: equal rewards are counted by comparing them."""
    src = make_source([ALL * 2, MIXED * 2, MIXED * 2], max_staleness=0, refill_rounds=10)
    src.cfg.group_size = 8
    src.reward_weights = {"correctness": 1.2}
    st = next(src).stats
    assert st["groups/zero_adv_dropped"] == 1
    assert st["frac_reward_zero_std"] == pytest.approx(1 / 3)
