"""Checkpoints: atomic, pruned, complete; a SIGKILL during a save leaves the previous one loadable."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import torch

import herd
from herd.train import checkpoint
from tests.conftest import model_config


def _state(step):
    return {"step": step, "optimizer": {"state": {}, "param_groups": []}, "rng": checkpoint.rng_state()}


def test_save_list_prune_and_latest(tmp_path):
    m = herd.build_model(model_config(vision=False), seed=0)
    for step in (10, 20, 30, 40):
        checkpoint.save_checkpoint(tmp_path, step, m, _state(step), keep=2)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["step_000030", "step_000040"]
    latest = checkpoint.latest_checkpoint(tmp_path)
    assert latest.name == "step_000040" and checkpoint.load_trainer_state(latest)["step"] == 40
    loaded = herd.load_model(latest)  # a checkpoint folder is a Hugging Face model folder
    assert torch.equal(loaded.language_model.lm_head.weight, m.language_model.lm_head.weight)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    state = checkpoint.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    torch.save(state, tmp_path / "s.pt")
    checkpoint.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True))
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys, torch, herd
        from herd.train import checkpoint
        from tests.conftest import model_config
        m = herd.build_model(model_config(vision=False), seed=0)
        checkpoint.save_checkpoint({str(tmp_path)!r}, 1, m, {{"step": 1}})
        with torch.no_grad():
            m.language_model.lm_head.weight.add_(1.0)
        print("first saved", flush=True)
        os.environ["HERD_TEST_SLOW_SAVE"] = "30"  # sleep between writing weights and state
        checkpoint.save_checkpoint({str(tmp_path)!r}, 2, m, {{"step": 2}})
        print("second saved", flush=True)
    """)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    assert line.strip() == "first saved"
    time.sleep(2)  # now inside the second save (sleeping between weights and state)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(p.name.startswith(".tmp-step_000002") for p in (tmp_path / "checkpoints").iterdir())
    latest = checkpoint.latest_checkpoint(tmp_path)
    assert latest.name == "step_000001"
    assert checkpoint.load_trainer_state(latest)["step"] == 1
    m = herd.build_model(model_config(vision=False), seed=0)
    loaded = herd.load_model(latest)
    assert torch.equal(loaded.language_model.lm_head.weight, m.language_model.lm_head.weight)
    # the next save cleans up the dead process's temporary folder
    checkpoint.save_checkpoint(tmp_path, 3, m, {"step": 3})
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
