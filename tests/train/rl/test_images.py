"""Image tasks: multi-image digit VQA prompts go through the rollout Engine and the learner's
forward with their images (sampler and learner agree, and the images change the log-probs)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from herd.train.loop import init_from
from herd.train.rl.actor import RolloutWorker
from herd.train.rl.learner import GRPOObjective, collate, load_items, prompt_inputs, train
from herd.train.rl.rewards import correctness
from tests.train.rl.conftest import tiny_cfg


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory):
    from tests.train.conftest import chat_model_dir

    out, _ = chat_model_dir(tmp_path_factory.mktemp("rl_vision"), vision=True)
    return out


def test_digit_vqa_items_carry_images_and_a_verifier():
    train_items, val_items = load_items("digits_vqa", per_task=20, seed=0)
    assert train_items and val_items
    multi = [it for it in train_items if sum(p.get("type") == "image_url" for p in it["messages"][0]["content"]) > 1]
    assert multi, "no multi-image prompt"
    it = multi[0]
    assert correctness(prompts=None, completions=[it["answer"], it["answer"] + "0"], verifier=[it["verifier"]] * 2,
                       answer=[it["answer"]] * 2) == [1.0, 0.0]


def test_image_rollouts_agree_with_the_learner_and_the_images_matter(vision_model):
    learner, tok = init_from(vision_model)
    worker_model, _ = init_from(vision_model)
    worker = RolloutWorker(worker_model, tok, max_new_tokens=6, seed=1)
    items, _ = load_items("digits_vqa", per_task=10, seed=0)
    items = [it for it in items if sum(p.get("type") == "image_url" for p in it["messages"][0]["content"]) > 1][:2]
    inputs = [prompt_inputs(tok, it, learner.config.vision) for it in items]
    groups, images = [], []
    for i, (ids, tiles) in enumerate(inputs):
        assert tiles is not None and tiles.shape[0] >= 2  # ≥ 2 images, ≥ 1 tile each: [n_tiles, 3, S, S]
        g = worker.rollout(i, ids, 3, pixel_values=tiles)
        g.rewards = [1.0, 0.0, 1.0]
        groups.append(g)
        images.append(tiles)
    batch = collate(groups, [torch.tensor([1.0, -1.0, 1.0])] * 2, 0, {}, images)
    assert batch.pixel_values.shape[0] == 3 * sum(t.shape[0] for t in images)  # each row carries its prompt's tiles
    cfg = tiny_cfg(vision_model, "unused")
    with torch.no_grad():
        logps, _ = GRPOObjective.token_logps(learner, batch)
        _, n, m = GRPOObjective(cfg)(learner, batch)
        assert m["mismatch_kl"] / n <= 1e-6
        assert ((logps - batch.old_logps) * batch.mask).abs().max() < 1e-4
        other = batch.pixel_values.flip(0)  # the same tiles, shuffled between rows and images
        wrong, _ = GRPOObjective.token_logps(learner, type(batch)(**{**batch.__dict__, "pixel_values": other}))
    assert ((wrong - batch.old_logps) * batch.mask).abs().max() > 1e-3  # the images reach the learner's forward


def test_a_digit_vqa_rl_run_in_process(vision_model, tmp_path):
    out = tmp_path / "vqa"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        summary = train(tiny_cfg(vision_model, out, tasks="digits_vqa", per_task=15, max_steps=2, eval_every=2,
                                 refill_rounds=1, max_staleness=0, rewards="correctness:1,format:0.2"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and summary["step"] == 2
    assert all(r["mismatch_kl"] <= 1e-6 for r in rows)
    assert "rewards/correctness/mean" in rows[0] and 0 <= rows[-1]["eval/accuracy"] <= 1


def test_image_tasks_on_a_text_only_model_are_one_clear_error(rl_model, tmp_path):
    with pytest.raises(ValueError, match="text-only"):
        train(tiny_cfg(rl_model, tmp_path / "x", tasks="digits_vqa", per_task=10))
