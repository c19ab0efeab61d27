"""`herd midtrain --teacher DIR`: codistillation during mid-training through the one loop (the same
DistillObjective as `herd train --teacher`), logged, resumed exactly, and refused on bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file as read_safetensors

import herd
from herd.cli import main
from herd.train.midtrain import MidtrainConfig, midtrain
from tests.conftest import model_config
from tests.train.test_midtrain import init_dir, metrics, settings  # noqa: F401 (init_dir is a fixture)


@pytest.fixture(scope="module")
def teacher_dir(init_dir, tmp_path_factory):  # noqa: F811
    """A wider random teacher with the init run's tokenizer and vocabulary."""
    from herd.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("teacher")
    tok = load_tokenizer(init_dir)
    cfg = model_config(vision=False, text=dict(vocab_size=1024, hidden_size=64, intermediate_size=64,
                                               intermediate_size_mlp=128, bos_token_id=tok.bos_id,
                                               eos_token_id=[tok.eos_id], max_position_embeddings=128))
    herd.save_model(herd.build_model(cfg, seed=11), d)
    tok.save(d)
    return d


def test_midtrain_with_a_teacher_logs_the_parts_and_resumes_exactly(init_dir, teacher_dir, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    kw = dict(teacher=str(teacher_dir), distill_weight="linear:1:0.5", distill_temperature=2.0)
    midtrain(settings(init_dir, tmp_path / "full", cache, **kw))
    rows = metrics(tmp_path / "full")
    assert [r["stage"] for r in rows] == ["len256"] * 2 + ["len512"] * 2  # the curriculum, unchanged
    assert [r["distill/weight"] for r in rows] == pytest.approx([1.0, 0.875, 0.75, 0.625])
    for r in rows:  # loss = w·soft + (1 − w)·hard per token, soft = T²·KL
        w = r["distill/weight"]
        assert r["loss"] == pytest.approx(w * r["distill/soft_loss"] + (1 - w) * r["distill/hard_loss"], rel=1e-4, abs=2e-5)
        assert r["distill/kl"] == pytest.approx(r["distill/soft_loss"] / 4, rel=1e-4, abs=2e-5)  # logged to 5 decimals
        assert r["distill/teacher_ce"] > 0
    assert "short_val_loss" in rows[-1]  # validation stays plain cross-entropy at the short length

    # the plain run differs (the teacher really took part)
    midtrain(settings(init_dir, tmp_path / "plain", cache))
    assert metrics(tmp_path / "plain")[1]["loss"] != rows[1]["loss"]

    # stopped after step 2 (a checkpoint inside the curriculum) and resumed: the same run, bit for bit
    part = tmp_path / "part"
    midtrain(settings(init_dir, part, cache, stop_after=2, **kw))
    midtrain(settings(init_dir, part, cache, resume=True, **kw))
    cut = metrics(part)
    assert [r["loss"] for r in cut] == [r["loss"] for r in rows]
    assert [r["distill/weight"] for r in cut] == [r["distill/weight"] for r in rows]
    wa, wb = read_safetensors(tmp_path / "full" / "model.safetensors"), read_safetensors(part / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_midtrain_teacher_bad_input_is_one_clear_error(init_dir, teacher_dir, tmp_path, capsys):  # noqa: F811
    with pytest.raises(ValueError, match="need --teacher"):
        MidtrainConfig(teacher_topk=8).validate()
    with pytest.raises(ValueError, match="--distill-weight"):
        MidtrainConfig(teacher=str(teacher_dir), distill_weight="often").validate()
    other = tmp_path / "other_vocab"  # same tokenizer file, another vocabulary size
    herd.save_model(herd.build_model(model_config(vision=False), seed=0), other)
    (other / "tokenizer.json").write_text((teacher_dir / "tokenizer.json").read_text())
    base = ["midtrain", "--init", str(init_dir), "--out", str(tmp_path / "run"), "--curriculum", "256:1",
            "--batch-tokens", "512", "--tasks", "niah_single_1", "--max-steps", "2", "--max-docs", "10",
            "--data-cache", str(tmp_path / "cache"), "--no-progress"]
    for teacher, match in ((tmp_path / "missing", "not a model directory"), (other, "vocabulary of")):
        assert main([*base, "--teacher", str(teacher)]) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
