"""A tiny text-only chat model directory (trained BPE + random Llama 4) for the RL tests."""

from __future__ import annotations

import pytest

from tests.train.conftest import chat_model_dir


@pytest.fixture(scope="session")
def rl_model(tmp_path_factory):
    out, tok = chat_model_dir(tmp_path_factory.mktemp("rl_model"), vision=False)
    return out


def tiny_cfg(init, out, **kw):
    from herd.train.rl.learner import RLConfig

    base = dict(init=str(init), tasks="chain_sum", out=str(out), max_steps=3, group_size=4, prompts_per_step=2,
                max_new_tokens=6, per_task=40, eval_prompts=4, eval_every=3, ckpt_every=1, workers=0,
                rewards="format:1", constant_steps=100, progress=False, refill_rounds=6)
    base.update(kw)
    return RLConfig(**base)
