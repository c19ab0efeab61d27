"""`herd train --teacher` under torchrun: the online teacher sharded with FSDP2 like the student
(herd.train.distill.shard_teacher) gives the distillation loss one process gives, and the 2-rank
checkpoint resumes in one process with the same teacher.

As in tests/train/test_trainer.py, fp32 and no routing (tests/train/dense_train.py makes the tiny
student dense; the teacher is the tiny recipe made wider and dense), so the two runs differ only by
float32 summation order."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import herd
from herd.model.weights import save_model

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
DENSE = str(Path(__file__).with_name("dense_train.py"))


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_tokenizer):
    from herd.presets import scaled_tiny
    from herd.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("distill_torchrun")
    cfg = scaled_tiny(384, 2)
    cfg.text.moe_layers = []
    save_model(herd.build_model(cfg, seed=5), root / "teacher")
    load_tokenizer(tiny_tokenizer).save(root / "teacher")
    return {"tokenizer": tiny_tokenizer, "data_cache": str(root / "cache"), "teacher": str(root / "teacher")}


def _herd(launcher: list[str], shared, out, *more: str) -> str:
    args = ["train", "--preset", "tiny", "--batch-size", "4", "--seq-len", "64", "--warmup", "2", "--eval-every", "100",
            "--log-every", "1", "--max-docs", "25", "--no-progress", "--threads", "1", "--no-bf16",
            "--tokenizer", shared["tokenizer"], "--data-cache", shared["data_cache"], "--teacher", shared["teacher"],
            "--distill-weight", "linear:1:0.5", "--distill-temperature", "2", "--out", str(out), *more]
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    r = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def metrics(out):
    return [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_with_a_sharded_teacher_give_the_one_process_distillation_loss(tmp_path, shared):
    two, one = tmp_path / "two", tmp_path / "one"
    log = _herd([*TORCHRUN, DENSE], shared, two, "--max-steps", "2", "--stop-after", "1")
    local, total = map(int, re.search(r"teacher sharded with FSDP2 across 2 ranks: rank 0 holds (\d+) of its (\d+)",
                                      log).groups())
    assert 0.4 * total < local < 0.6 * total  # half the teacher per rank (dim-0 shards, a few rows uneven)
    assert "teacher sharded" not in _herd([sys.executable, DENSE], shared, one, "--max-steps", "2", "--stop-after", "1")
    (a,), (b,) = metrics(two), metrics(one)
    for k in ("loss", "distill/soft_loss", "distill/hard_loss", "distill/kl", "distill/teacher_ce"):
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5), (k, a, b)
    assert a["distill/weight"] == b["distill/weight"] == 1.0
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-4), (a, b)
    # the 2-rank checkpoint holds full tensors: it loads, and one process resumes it with the teacher
    assert herd.load_model(two / "checkpoints" / "step_000001").config.is_multimodal
    _herd([sys.executable, DENSE], shared, two, "--max-steps", "2", "--resume")
    _herd([sys.executable, DENSE], shared, one, "--max-steps", "2", "--resume")
    ra, rb = metrics(two), metrics(one)
    assert [x["step"] for x in ra] == [1, 2] and ra[1]["distill/weight"] == rb[1]["distill/weight"] == 0.75
    assert ra[1]["loss"] == pytest.approx(rb[1]["loss"], rel=1e-4)
