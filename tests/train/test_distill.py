"""Distillation (herd.train.distill): the fused, chunked loss against a float64 reference on full
logits (values and gradients, dense and both top-k modes), schedule endpoints, masking, online =
offline teacher targets, and the errors for mismatched teachers and files."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from herd.data.packing import Batch
from herd.model.llama4 import build_model
from herd.model.loss import linear_cross_entropy
from herd.train.distill import (DenseTargets, DistillObjective, OfflineTargets, WeightSchedule,
                                linear_distill, teacher_forward, topk_targets)
from tests.conftest import model_config


def _inputs(N=120, H=24, Ht=40, V=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    ht = torch.randn(N, Ht, generator=g)
    wt = torch.randn(V, Ht, generator=g) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    y[:9] = -100
    y[-1] = -100
    return h, w, ht, wt, y


def _reference(h, w, ht, wt, y, T, k=None, mode="renorm"):
    """(soft = T²·ΣKL, hard = ΣCE, teacher ΣCE) in float64 on full logits, written from the definitions."""
    h, w, ht, wt = (t.double() for t in (h, w, ht, wt))
    z, zt = h @ w.T, ht @ wt.T
    keep = y != -100
    logq = torch.log_softmax(z / T, -1)
    if k is None:
        p = torch.softmax(zt / T, -1)
        kl = (p * (p.log() - logq)).sum(-1)
    else:
        idx = zt.topk(k, -1).indices
        if mode == "renorm":
            p = torch.softmax(zt.gather(1, idx) / T, -1)
            kl = (p * (p.log() - logq.gather(1, idx))).sum(-1)
        else:  # the top k as they are plus one bucket for all the other tokens
            pk = torch.softmax(zt / T, -1).gather(1, idx)
            qk = logq.exp().gather(1, idx)
            pt, qt = 1 - pk.sum(-1), 1 - qk.sum(-1)
            kl = (pk * (pk / qk).log()).sum(-1) + pt * (pt / qt).log()
    soft = T * T * kl[keep].sum()
    hard = F.cross_entropy(z, y, ignore_index=-100, reduction="sum")
    tce = F.cross_entropy(zt, y, ignore_index=-100, reduction="sum")
    return soft, hard, tce


CASES = [(1.0, None, "renorm"), (2.0, None, "renorm"), (1.0, 17, "renorm"), (2.5, 17, "renorm"),
         (1.0, 17, "tail"), (2.0, 5, "tail")]


@pytest.mark.parametrize("T,k,mode", CASES)
@pytest.mark.parametrize("chunk", [None, 7])
def test_parts_and_gradients_match_float64_reference(T, k, mode, chunk):
    h, w, ht, wt, y = _inputs()
    h1, w1 = h.double().requires_grad_(), w.double().requires_grad_()
    soft_r, hard_r, tce_r = _reference(h1, w1, ht, wt, y, T, k, mode)
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    parts = linear_distill(h2, w2, y, DenseTargets(ht, wt, topk=k), T, mode, chunk_size=chunk)
    assert parts.tokens == int((y != -100).sum())
    for got, ref in ((parts.soft, soft_r), (parts.hard, hard_r), (parts.teacher_ce, tce_r)):
        assert math.isclose(float(got.detach()), float(ref.detach()), rel_tol=2e-5, abs_tol=1e-4)
    wgt = 0.3  # a mixed loss and a non-unit incoming gradient
    (1.7 * (wgt * soft_r + (1 - wgt) * hard_r)).backward()
    (1.7 * parts.loss(wgt)).backward()
    torch.testing.assert_close(h2.grad, h1.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w2.grad, w1.grad.float(), rtol=1e-4, atol=1e-5)
    assert h2.grad[:9].abs().max() == 0  # masked positions pass no gradient


def test_schedule_endpoints_are_plain_kl_and_plain_cross_entropy():
    h, w, ht, wt, y = _inputs()
    T = 2.0
    grads = {}
    for wgt in (0.0, 1.0):
        h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
        parts = linear_distill(h2, w2, y, DenseTargets(ht, wt), T)
        loss = parts.loss(wgt)
        loss.backward()
        grads[wgt] = (float(loss.detach()), h2.grad, w2.grad)
    # w = 0: exactly herd's fused cross-entropy, value and gradients
    h3, w3 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ce = linear_cross_entropy(h3, w3, y)
    ce.backward()
    assert math.isclose(grads[0.0][0], float(ce.detach()), rel_tol=1e-6)
    torch.testing.assert_close(grads[0.0][1], h3.grad)
    torch.testing.assert_close(grads[0.0][2], w3.grad)
    # w = 1: plain T²·KL(p_T ‖ q_T) on full logits
    h4, w4 = h.clone().requires_grad_(), w.clone().requires_grad_()
    keep = y != -100
    logq = torch.log_softmax((h4 @ w4.T) / T, -1)
    kl = F.kl_div(logq[keep], torch.log_softmax((ht @ wt.T) / T, -1)[keep], log_target=True, reduction="sum")
    (T * T * kl).backward()
    assert math.isclose(grads[1.0][0], float(T * T * kl), rel_tol=1e-5)
    torch.testing.assert_close(grads[1.0][1], h4.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1.0][2], w4.grad, rtol=1e-4, atol=1e-6)


def test_masked_positions_ignore_the_teacher_and_identical_teacher_gives_zero_kl():
    h, w, ht, wt, y = _inputs()
    a = linear_distill(h, w, y, DenseTargets(ht, wt), 1.5)
    ht2 = ht.clone()
    ht2[:9] = torch.randn(9, ht.shape[1]) * 5  # only masked positions change
    b = linear_distill(h, w, y, DenseTargets(ht2, wt), 1.5)
    assert float(a.soft) == float(b.soft) and float(a.teacher_ce) == float(b.teacher_ce)
    same = linear_distill(h, w, y, DenseTargets(h, w), 1.5)  # the student is its own teacher
    assert abs(float(same.kl)) < 1e-4 and math.isclose(float(same.teacher_ce), float(same.hard), rel_tol=1e-6)


def test_bf16_autocast_stays_close_to_float32():
    h, w, ht, wt, y = _inputs()
    ref = linear_distill(h, w, y, DenseTargets(ht, wt, topk=17), 2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
        got = linear_distill(h2, w2, y, DenseTargets(ht, wt, torch.bfloat16, topk=17), 2.0)
    got.loss(0.5).backward()
    assert w2.grad.dtype == torch.float32 and h2.grad.dtype == torch.float32
    assert math.isclose(float(got.soft), float(ref.soft), rel_tol=3e-2)
    assert math.isclose(float(got.hard), float(ref.hard), rel_tol=1e-2)


def test_offline_topk_targets_give_the_online_loss_and_other_temperatures_renormalise_exactly():
    h, w, ht, wt, y = _inputs()
    online = linear_distill(h, w, y, DenseTargets(ht, wt, topk=17), 2.0)
    stored = topk_targets(ht @ wt.T, y, 17, 2.0)
    offline = linear_distill(h, w, y, stored, 2.0)
    assert float(online.soft) == pytest.approx(float(offline.soft), rel=1e-6)
    # targets stored at T = 1 serve a run at T = 3 in renorm mode: softmax(z/T) over the same top k
    at1 = linear_distill(h, w, y, topk_targets(ht @ wt.T, y, 17, 1.0), 3.0)
    direct = linear_distill(h, w, y, DenseTargets(ht, wt, topk=17), 3.0)
    assert float(at1.soft) == pytest.approx(float(direct.soft), rel=1e-5)


def test_weight_schedules():
    assert WeightSchedule.parse("0.25")(0.9, 5.0, 1.0) == 0.25
    lin = WeightSchedule.parse("linear:1:0.2")
    assert lin(0.0, 0, 0) == 1.0 and lin(1.0, 0, 0) == pytest.approx(0.2) and lin(0.5, 0, 0) == pytest.approx(0.6)
    gap = WeightSchedule.parse("gap")
    assert gap(0.3, 4.0, 4.5) == 0.0  # the student already predicts the data better: hard labels only
    assert gap(0.3, 5.0, 4.0) == pytest.approx(1 - math.exp(-1))
    assert gap(0.3, 20.0, 4.0) > 0.999
    assert WeightSchedule.parse("gap:0.5")(0, 5.0, 4.0) == pytest.approx(1 - math.exp(-2))
    assert str(WeightSchedule.parse("linear:1:0")) == "linear:1:0"
    for bad in ("1.5", "linear:1", "gap:0", "fast", "linear:a:b", "-0.1"):
        with pytest.raises(ValueError, match="--distill-weight"):
            WeightSchedule.parse(bad)


def test_bad_targets_raise_clear_errors():
    h, w, ht, wt, y = _inputs()
    with pytest.raises(ValueError, match="vocabulary"):
        linear_distill(h, w, y, DenseTargets(ht, wt[:-1]), 1.0)
    with pytest.raises(ValueError, match="--teacher-topk"):
        linear_distill(h, w, y, DenseTargets(ht, wt, topk=w.shape[0] + 1), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        linear_distill(h, w, y, topk_targets(ht @ wt.T, y, 5, 1.0), 2.0, "tail")
    with pytest.raises(ValueError, match="positions"):
        linear_distill(h, w, y, DenseTargets(ht[:-1], wt), 1.0)


# ----- teachers, online and offline, on real models -----------------------------------------------
class _Stream:
    """The parts of herd.data.PackedStream the offline precompute and keys use."""

    def __init__(self, batches, batch_size, seq_len, seed=0):
        self._batches, self.seed, self.world_size = batches, seed, 1
        self.config = type("C", (), {"batch_size": batch_size, "seq_len": seq_len})()
        self._i = 0

    def fresh(self):
        return _Stream(self._batches, self.config.batch_size, self.config.seq_len, self.seed)

    def __next__(self):
        self._i += 1
        return self._batches[self._i - 1]

    def state_dict(self):
        return {"identity": {"seed": self.seed, "seq_len": self.config.seq_len}}


def _models(vision=False):
    student = build_model(model_config(vision=vision), seed=0).eval()
    teacher = build_model(model_config(vision=vision, text={"hidden_size": 96, "num_hidden_layers": 2}), seed=1)
    return student, teacher.eval().requires_grad_(False)


def _batches(n=3, B=2, T=24, V=512, bos=500):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(0, 400, (B, T), generator=g)
        ids[:, 0] = bos
        ids[0, T // 2] = bos  # two documents in the first row
        labels = torch.roll(ids, -1, 1)
        labels[:, -1] = -100
        labels[labels == bos] = -100
        segs = [[("text", f"doc{i}-{r}", 0, T)] for r in range(B)]
        out.append(Batch(ids, labels, None, int((labels != -100).sum()), segments=segs))
    return out


@pytest.mark.parametrize("bf16", [False, True])
def test_online_and_offline_targets_give_the_same_loss_on_the_same_batch(tmp_path, bf16):
    student, teacher = _models()
    batches = _batches()
    stream = _Stream(batches, 2, 24)
    path = OfflineTargets.precompute(tmp_path / "targets", teacher, stream, 3, 8, 2.0, teacher_key="t1",
                                     data_key="d1", bos_id=500, bf16=bf16)
    offline = OfflineTargets(path, "t1", "d1")
    assert offline.index.dtype.name == "uint16" and offline.index.shape == (6, 24, 8)
    sched = WeightSchedule.parse("gap")
    on = DistillObjective("cpu", 500, sched, 2.0, teacher=teacher, topk=8)
    off = DistillObjective("cpu", 500, sched, 2.0, offline=offline)
    for b in batches[::-1]:  # any order: rows are found by their content
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            l1, n1, m1 = on(student, b)
            l2, n2, m2 = off(student, b)
        assert n1 == n2 == b.n_tokens
        assert float(l1) == pytest.approx(float(l2), rel=1e-6)
        for k in m1:
            assert m1[k] == pytest.approx(m2[k], rel=1e-6, abs=1e-6), k
    # the gap schedule: the teacher's label log-probs are in the file too
    assert m1["distill/teacher_ce"] > 0 and 0 <= m1["distill/weight"] / n1 <= 1


def test_offline_file_from_another_teacher_or_data_is_refused(tmp_path):
    _, teacher = _models()
    batches = _batches(n=1)
    path = OfflineTargets.precompute(tmp_path / "t", teacher, _Stream(batches, 2, 24), 1, 4, 1.0, teacher_key="t1",
                                     data_key="d1", bos_id=500, bf16=False)
    with pytest.raises(ValueError, match="another teacher"):
        OfflineTargets(path, "t2", "d1")
    with pytest.raises(ValueError, match="another token stream"):
        OfflineTargets(path, "t1", "d2")
    with pytest.raises(ValueError, match="no offline targets"):
        OfflineTargets(tmp_path / "nothing", "t1", "d1")
    other = _batches(n=2)[1]
    with pytest.raises(ValueError, match="not among the precomputed"):
        OfflineTargets(path, "t1", "d1").lookup(other)
    with pytest.raises(ValueError, match="--teacher-topk"):
        OfflineTargets.precompute(tmp_path / "u", teacher, _Stream(batches, 2, 24), 1, 513, 1.0, teacher_key="t1",
                                  data_key="d1", bos_id=500)
    assert not (tmp_path / "u").exists()


def test_distillation_trains_a_student_towards_its_teacher():
    """A few steps of pure distillation (w = 1) from a fixed teacher lower the KL."""
    student, teacher = _models()
    student.train()
    batch = _batches(n=1)[0]
    obj = DistillObjective("cpu", 500, WeightSchedule.parse("1"), 1.0, teacher=teacher)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    kls = []
    for _ in range(8):
        loss, n, m = obj(student, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        kls.append(m["distill/kl"] / n)
    assert kls[-1] < 0.6 * kls[0]
    assert obj.state_dict() == {"calls": 8}


def test_teacher_forward_images_and_the_linear_schedule_step_count():
    student, teacher = _models(vision=True)
    cfg = student.config
    n_img = cfg.vision.tokens_per_tile
    ids = torch.randint(0, 400, (1, 16))
    ids[0, 2:2 + n_img] = cfg.image_token_index
    px = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    dense = teacher_forward(teacher, ids, px)
    assert dense.h.shape == (16, 96) and dense.vocab_size == 512
    labels = torch.roll(ids, -1, 1)
    labels[0, -1] = -100
    b = Batch(ids, labels, px, int((labels != -100).sum()))
    obj = DistillObjective("cpu", None, WeightSchedule.parse("linear:1:0"), teacher=teacher, max_steps=4, grad_accum=2)
    ws = []
    for _ in range(8):
        _, n, m = obj(student, b)
        ws.append(m["distill/weight"] / n)
    assert ws == pytest.approx([1, 1, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25])
    with torch.no_grad():  # evaluation does not advance the schedule
        obj(student, b)
    assert obj.calls == 8


# ----- herd train --teacher ------------------------------------------------------------------------
TRAIN = dict(preset="tiny", width=128, layers=2, batch_size=2, seq_len=32, warmup=1, eval_every=100, eval_batches=1,
             log_every=1, max_docs=20, progress=False, lr=3e-3, ckpt_every=2)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_tokenizer):
    """A tokenizer of the tiny vocabulary (tests/train/conftest.py), a data cache, a random teacher
    (wider than the student) and texts for another tokenizer."""
    from herd.data import training_texts
    from herd.model.weights import save_model
    from herd.presets import scaled_tiny
    from herd.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("distill")
    texts = [t for _, t in zip(range(80), training_texts(limit=30))]
    teacher = root / "teacher"
    save_model(build_model(scaled_tiny(256, 2), seed=7), teacher)
    load_tokenizer(tiny_tokenizer).save(teacher)
    return {"tokenizer": tiny_tokenizer, "data_cache": str(root / "cache"), "teacher": str(teacher),
            "root": root, "texts": texts}


def _train(out, assets, **kw):
    from herd.train.trainer import TrainConfig, train

    base = {k: assets[k] for k in ("tokenizer", "data_cache", "teacher")}
    return train(TrainConfig(out=str(out), **{**TRAIN, **base, **kw}))


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_with_a_teacher_logs_the_parts_and_resumes_exactly(tmp_path, assets):
    from herd.model.weights import read_safetensors

    kw = dict(max_steps=4, distill_weight="linear:1:0.2", distill_temperature=2.0)
    _train(tmp_path / "full", assets, **kw)
    _train(tmp_path / "cut", assets, stop_after=2, **kw)
    _train(tmp_path / "cut", assets, resume=True, **kw)
    full, cut = _rows(tmp_path / "full"), _rows(tmp_path / "cut")
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    for k in ("distill/soft_loss", "distill/hard_loss", "distill/kl", "distill/teacher_ce", "distill/weight"):
        assert all(k in r for r in full), k
    assert [r["distill/weight"] for r in full] == pytest.approx([1.0, 0.8, 0.6, 0.4])
    r = full[0]  # loss = w·soft + (1 − w)·hard, per token
    assert r["loss"] == pytest.approx(r["distill/soft_loss"], rel=1e-4)
    assert r["distill/kl"] == pytest.approx(r["distill/soft_loss"] / 4, rel=1e-4)
    assert "val_loss" in full[-1]  # validation stays plain cross-entropy
    assert [x["loss"] for x in cut] == [x["loss"] for x in full]
    assert [x["distill/weight"] for x in cut] == [x["distill/weight"] for x in full]
    a, b = read_safetensors(tmp_path / "full" / "model.safetensors"), read_safetensors(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_offline_targets_match_online_topk(tmp_path, assets):
    kw = dict(max_steps=3, teacher_topk=16, distill_weight="gap", eval_every=100)
    _train(tmp_path / "online", assets, **kw)
    _train(tmp_path / "offline", assets, teacher_targets=str(tmp_path / "targets"), **kw)
    assert (tmp_path / "targets" / "meta.json").exists()
    on, off = _rows(tmp_path / "online"), _rows(tmp_path / "offline")
    for a, b in zip(on, off):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["distill/kl"] == pytest.approx(b["distill/kl"], rel=1e-4)
    # a second run reuses the file; a longer one is refused before training
    _train(tmp_path / "again", assets, teacher_targets=str(tmp_path / "targets"), **kw)
    with pytest.raises(ValueError, match="cover 3 batches"):
        _train(tmp_path / "longer", assets, teacher_targets=str(tmp_path / "targets"), **{**kw, "max_steps": 5})


def test_bad_teachers_and_settings_fail_before_training(tmp_path, assets):
    import herd
    from herd.model.weights import save_model
    from herd.presets import scaled_tiny
    from herd.tokenizer import load_tokenizer
    from herd.tokenizer_train import train_tokenizer
    from herd.train.distill import load_teacher
    from herd.train.trainer import TrainConfig

    student, tok = herd.get_config("tiny"), load_tokenizer(assets["tokenizer"])

    def bad_teacher(match, directory):
        with pytest.raises(ValueError, match=match):
            load_teacher(directory, student, tok)

    bad_teacher("not a model directory", tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    (broken / "tokenizer.json").write_text("{}")
    bad_teacher("does not load", broken)
    small_vocab = tmp_path / "small_vocab"
    save_model(build_model(model_config(), seed=0), small_vocab)
    tok.save(small_vocab)
    bad_teacher("vocabulary of 512", small_vocab)
    other_tok = tmp_path / "other_tok"
    train_tokenizer(assets["texts"][40:], 8192, other_tok)
    save_model(build_model(scaled_tiny(128, 2), seed=0), other_tok)
    bad_teacher("another tokenizer", other_tok)
    for match, kw in (("--distill-weight", dict(teacher="t", distill_weight="sometimes")),
                      ("need --teacher", dict(distill_weight="0.5")),
                      ("need --teacher", dict(teacher_targets="x")),
                      ("temperature must be positive", dict(teacher="t", distill_temperature=0.0))):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kw).validate()

    def fails(match, **kw):  # through herd train: refused before the first step
        with pytest.raises(ValueError, match=match):
            _train(tmp_path / "run", assets, **{"max_steps": 1, **kw})
        assert not (tmp_path / "run" / "metrics.jsonl").exists()

    fails("--teacher-topk", teacher_topk=8193)
    fails("--teacher-topk K", teacher_targets=str(tmp_path / "t"))
    # an offline file from another teacher, or one that does not cover the run
    _train(tmp_path / "first", assets, max_steps=1, teacher_topk=4, teacher_targets=str(tmp_path / "t4"))
    other = tmp_path / "other_teacher"
    save_model(build_model(scaled_tiny(128, 2), seed=3), other)
    tok.save(other)
    fails("another teacher", teacher=str(other), teacher_topk=4, teacher_targets=str(tmp_path / "t4"))
    fails("cover 1 batches", teacher_topk=4, teacher_targets=str(tmp_path / "t4"), max_steps=2)
