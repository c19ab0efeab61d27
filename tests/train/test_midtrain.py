"""Long-context mid-training (herd/train/midtrain.py): the curriculum, the mixture of long synthetic
and pre-training batches, the short-context regression log, and bit-exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file as read_safetensors

import herd
from herd.cli import main
from herd.train.midtrain import MidtrainConfig, MixedSource, long_document, midtrain, parse_curriculum
from tests.conftest import random_model_dir


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    """A 'pre-trained' run directory: random text model (vocab 1024) + tokenizer + train_config.json."""
    from herd.data.loader import training_texts

    d = random_model_dir(tmp_path_factory.mktemp("pretrained"), list(training_texts(limit=20)), 1024, seed=3,
                         chat_ids=True, text=dict(hidden_size=32, intermediate_size=32, intermediate_size_mlp=64,
                                                  max_position_embeddings=256))
    (d / "train_config.json").write_text(json.dumps({"seq_len": 64, "mixture": {"shakespeare": 0.5, "python": 0.5}}))
    return d


def settings(init_dir, out, cache, **over):
    kw = dict(init=str(init_dir), out=str(out), curriculum="256:0.5,512:0.5", batch_tokens=512, long_ratio=0.5,
              tasks="niah_single_1,niah_single_2", max_steps=4, warmup=1, eval_every=2, ckpt_every=2, log_every=1,
              eval_batches=1, max_docs=10, data_cache=str(cache), bf16=False, progress=False, lr=3e-3)
    kw.update(over)
    return MidtrainConfig(**kw)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_curriculum_parses_and_covers_every_step():
    assert parse_curriculum("512:0.5,2k:0.3,8k:0.2") == [(512, 0.5), (2048, 0.3), (8192, 0.2)]
    cfg = MidtrainConfig(curriculum="512:0.5,2k:0.3,8k:0.2", max_steps=60)
    assert cfg.stages() == [(512, 0, 30), (2048, 30, 48), (8192, 48, 60)]
    with pytest.raises(ValueError, match="bad curriculum stage"):
        parse_curriculum("512:x")
    with pytest.raises(ValueError, match="unknown task"):
        MidtrainConfig(tasks="niah,nope").validate()


def test_long_documents_end_with_the_answer(init_dir):
    from herd.data.longctx import make_sample

    tok = herd.load_tokenizer(init_dir)
    s = make_sample(tok, "niah_single_1", 256 + 128 - 64, seed=0)
    doc = long_document(tok, s, 256)
    assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id and len(doc) <= 257
    assert s["answers"][0] in tok.decode(doc[-12:])


def test_mixed_source_mixes_and_resumes_exactly(init_dir, tmp_path):
    from herd.data import DataConfig, build_datasets

    tok = herd.load_tokenizer(init_dir)

    def source():
        short, _ = build_datasets(tok, DataConfig(seq_len=256, batch_size=2, max_docs=10, cache_dir=str(tmp_path),
                                                  weights={"bible": 1.0}, progress=False))
        return MixedSource(tok, 256, 2, 0.5, ["niah_single_1", "niah_single_2"], 0, short, tok.eos_id, "len256")

    a = source()
    batches = [next(a) for _ in range(6)]
    kinds = {"long" if b.pixel_values is None and (b.labels == -100).any() else "short" for b in batches}
    assert kinds == {"long", "short"}
    assert all(b.input_ids.shape == (2, 256) for b in batches)
    b = source()
    [next(b) for _ in range(3)]
    state = json.loads(json.dumps(b.state_dict()))
    c = source()
    c.load_state_dict(state)
    for want in batches[3:]:
        got = next(c)
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels)
    # under torchrun each rank builds its own rows of the same global long batch
    ranks = [MixedSource(tok, 256, 2, 1.0, ["niah_single_1", "niah_single_2"], 0, None, tok.eos_id, "len256", r, 2)
             for r in (0, 1)]
    one = MixedSource(tok, 256, 2, 1.0, ["niah_single_1", "niah_single_2"], 0, None, tok.eos_id, "len256")
    for _ in range(2):
        whole, parts = next(one), [next(r) for r in ranks]
        assert torch.equal(torch.cat([p.input_ids for p in parts]), whole.input_ids)


def test_midtraining_logs_short_loss_and_resumes_bit_exactly(init_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    full = tmp_path / "full"
    midtrain(settings(init_dir, full, cache))
    rows = metrics(full)
    assert [r["stage"] for r in rows] == ["len256"] * 2 + ["len512"] * 2
    evals = [r for r in rows if "short_val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    summary = json.loads((full / "summary.json").read_text())
    assert summary["short_len"] == 64 and summary["curriculum_lengths"] == [256, 512]
    start = summary["short_val_loss_start"]
    for r in evals:
        assert r["short_val_loss_change"] == pytest.approx(r["short_val_loss"] / start - 1, abs=1e-4)
        assert r["short_val_regressed"] == float(r["short_val_loss_change"] > 0.02)
    if any(r["short_val_regressed"] for r in evals):
        assert "short-context validation loss" in capsys.readouterr().err
    assert herd.load_model(full).config.text.max_position_embeddings == 512  # raised to serve the curriculum

    part = tmp_path / "part"
    midtrain(settings(init_dir, part, cache, stop_after=2))
    midtrain(settings(init_dir, part, cache, resume=True))
    a, b = metrics(full), metrics(part)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r.get("short_val_loss") for r in a] == [r.get("short_val_loss") for r in b]
    wa, wb = read_safetensors(full / "model.safetensors"), read_safetensors(part / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_warning_when_short_loss_rises(init_dir, tmp_path, capsys):
    # a learning rate far too high for this model wrecks short-context loss: the log must say so
    out = tmp_path / "hot"
    midtrain(settings(init_dir, out, tmp_path / "cache", curriculum="256:1", max_steps=3, eval_every=3, lr=0.5,
                      metap=False, long_ratio=1.0))
    r = [r for r in metrics(out) if "short_val_loss" in r][-1]
    assert r["short_val_regressed"] == 1.0
    assert "short-context validation loss" in capsys.readouterr().err


def test_cli_bad_input_is_one_clear_error(init_dir, tmp_path, capsys):
    rc = main(["midtrain", "--init", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "not a model directory" in capsys.readouterr().err
    # a stage too short for a task's template fails before any step runs
    rc = main(["midtrain", "--init", str(init_dir), "--out", str(tmp_path / "o2"), "--tasks", "vt",
               "--curriculum", "128:1", "--max-docs", "5", "--data-cache", str(tmp_path / "c"), "--no-progress"])
    assert rc == 2 and "too short for vt" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "checkpoints").exists()


def test_a_draw_without_a_valid_sample_is_drawn_again_deterministically(init_dir, monkeypatch):
    """file_defines can find no name defined exactly once in the files that fit a length: the row draws
    again from its own generator (same stream every run), and a generator that never succeeds still fails."""
    import herd.data.longctx as longctx

    tok = herd.load_tokenizer(init_dir)
    real = longctx.make_sample
    calls = []

    def flaky(tokenizer, task, length, *, index, **kw):
        calls.append(index)
        if index % 2:  # every odd draw has "no valid sample"
            raise ValueError("length too short for file_defines: no uniquely defined name in the context")
        return real(tokenizer, task, length, index=index, **kw)

    monkeypatch.setattr(longctx, "make_sample", flaky)
    rows = [next(MixedSource(tok, 256, 4, 1.0, ["niah_single_1"], 0, None, tok.eos_id, "len256")).input_ids
            for _ in range(2)]
    assert torch.equal(rows[0], rows[1]) and any(i % 2 for i in calls)  # retried, and the same both times

    def never(*a, **kw):
        raise ValueError("no valid sample")

    monkeypatch.setattr(longctx, "make_sample", never)
    with pytest.raises(ValueError, match="no valid sample"):
        next(MixedSource(tok, 256, 4, 1.0, ["niah_single_1"], 0, None, tok.eos_id, "len256"))
