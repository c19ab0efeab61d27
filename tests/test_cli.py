"""The `herd` command line: help, demo, and clean errors (no tracebacks) on bad input."""

from __future__ import annotations

import subprocess
import sys


def herd(*args, check=False):
    return subprocess.run([sys.executable, "-m", "herd", *args], capture_output=True, text=True, check=check)


def test_help_lists_subcommands():
    out = herd("--help", check=True).stdout
    for cmd in ("params", "demo"):
        assert cmd in out
    assert "active" in herd("params", "--help", check=True).stdout.lower()


def test_demo_runs_text_and_image_and_round_trips():
    r = herd("demo", check=True)
    assert "active per text token" in r.stdout
    assert "<|patch|> tokens replaced by image features" in r.stdout
    assert "logits identical = True" in r.stdout


def test_bad_preset_is_a_clean_error(tmp_path):
    r = herd("params", "llama5")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "neither a preset" in r.stderr
    r = herd("demo", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not a preset" in r.stderr
