"""The RL stage on a tiny model, in one process: sampler/learner agreement, the run, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import torch

from herd.train.loop import init_from
from herd.train.rl.actor import RolloutWorker
from herd.train.rl.learner import GRPOObjective, collate, train
from tests.train.rl.conftest import tiny_cfg


def test_sampler_and_learner_log_probs_agree_at_staleness_0(rl_model):
    """The worker samples with herd's Engine (KV cache, prepared fused weights, batched decode); the
    learner recomputes with the training forward. Same weights, float32: mismatch_kl ≤ 1e-6."""
    learner, tok = init_from(rl_model)
    worker_model, _ = init_from(rl_model)
    worker = RolloutWorker(worker_model, tok, max_new_tokens=12, seed=3)
    worker.set_weights({k: v.clone() for k, v in learner.state_dict().items()}, 0)
    prompts = [tok.encode("The sum of 3 and 4 is"), tok.encode("Hello there. How")]
    groups = [worker.rollout(i, p, 4) for i, p in enumerate(prompts)]
    for g in groups:
        g.rewards = [1.0, 0.0, 1.0, 0.0]
        assert g.version == 0 and all(len(c.logprobs) == len(c.token_ids) > 0 for c in g.completions)
    batch = collate(groups, [torch.tensor([1.0, -1.0, 1.0, -1.0])] * 2, 0, {})
    cfg = tiny_cfg(rl_model, "unused")
    with torch.no_grad():
        logps, _ = GRPOObjective.token_logps(learner, batch)
        loss, n, m = GRPOObjective(cfg)(learner, batch)
    assert n == sum(len(c.token_ids) for g in groups for c in g.completions)
    assert m["mismatch_kl"] / n <= 1e-6
    diff = ((logps - batch.old_logps) * batch.mask).abs().max()
    assert diff < 1e-4, diff


def test_worker_switches_to_offered_weights_at_the_next_request_and_waits_for_a_newer_floor(rl_model):
    """Weights offered while requests are queued (a Ray actor's weights thread) are taken when the
    next request starts, the newest wins, an older offer is ignored; a request sent at version v
    never runs on an older one: it waits for v's weights, and says so if they never come."""
    import threading

    import pytest

    model, tok = init_from(rl_model)
    worker = RolloutWorker(model, tok, max_new_tokens=3, seed=0)
    new = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    assert worker.offer_weights(new, 2) == 2 and worker.version == 0  # pending, not switched yet
    assert worker.offer_weights({}, 1) == 2  # older than the pending: ignored
    ids = tok.encode("Hello")
    assert worker.rollout(0, ids, 2).version == 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in new.items())  # the newest offer is in place
    later = threading.Timer(0.2, worker.offer_weights, (new, 3))  # weights still in transit when the request runs
    later.start()
    assert worker.rollout(0, ids, 2, min_version=3).version == 3
    with pytest.raises(RuntimeError, match="version 9 never arrived"):
        worker._switch(9, timeout=0.05)


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_in_process_run_logs_trl_metrics_and_resumes(rl_model, tmp_path):
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        train(tiny_cfg(rl_model, out, max_staleness=0, stop_after=2))
        r = rows(out)
        assert [x["step"] for x in r] == [1, 2]
        state = torch.load(sorted((out / "checkpoints").iterdir())[-1] / "trainer_state.pt", weights_only=False)
        assert state["step"] == 2 and state["data"]["pool"]["draws"] > 0  # pool statistics are checkpointed
        summary = train(tiny_cfg(rl_model, out, max_staleness=0, resume=True))
    r = rows(out)
    assert [x["step"] for x in r] == [1, 2, 3] and summary["step"] == 3
    assert 0 <= summary["initial_eval/accuracy"] <= 1  # the held-out score before RL, kept across the resume
    for x in r:
        for k in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "clip_ratio/low_mean",
                  "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy", "mismatch_kl", "staleness/max"):
            assert k in x, k
        assert x["mismatch_kl"] <= 1e-6 and x["staleness/max"] == 0
    assert 0 <= r[-1]["eval/reward"] <= 1 and 0 <= r[-1]["eval/accuracy"] <= 1  # held-out: reward, verifier pass rate
    assert (out / "rl.png").stat().st_size > 0 and (out / "model.safetensors").exists()


def test_resume_after_sigkill(rl_model, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "herd", "rl", "--init", str(rl_model), "--tasks", "chain_sum", "--out", str(out),
           "--workers", "0", "--max-steps", "5", "--group-size", "4", "--prompts-per-step", "2",
           "--max-new-tokens", "6", "--per-task", "40", "--eval-every", "100", "--eval-prompts", "2",
           "--ckpt-every", "1", "--rewards", "format:1", "--constant-steps", "100", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        ck = out / "checkpoints"
        if (ck / "step_000002").exists():
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout
    steps = [x["step"] for x in rows(out)]
    assert steps == sorted(set(steps)) and steps[-1] == 5
    assert json.loads((out / "summary.json").read_text())["step"] == 5


def test_cli_rejects_bad_flags_with_one_line(rl_model, tmp_path):
    for extra, msg in [(["--group-size", "1"], "group-size"), (["--tasks", "nonsense"], "not a verifiable"),
                       (["--rewards", "bogus:1"], "unknown reward")]:
        r = subprocess.run([sys.executable, "-m", "herd", "rl", "--init", str(rl_model), "--out", str(tmp_path / "x"),
                            "--workers", "0", "--no-progress", *extra], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
