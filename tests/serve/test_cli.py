"""`herd serve` from the command line: bad flags are one-line errors (exit 2), and a real process
serves a model directory with herd.safety's pipeline (--guards): /health 503 → 200, a chat request,
/v1/moderations, then it stops on SIGINT."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx

import herd
from tests.conftest import model_config
from tests.serve.conftest import free_port


def run_cli(argv):
    import herd.cli

    return herd.cli.main(argv)


def test_bad_flags_exit_2_with_one_line(capsys):
    assert run_cli(["serve", "tiny", "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err


def test_serve_a_model_directory_end_to_end(tiny, tmp_path):
    model, tok = tiny
    d = tmp_path / "m"
    herd.save_model(model, d)
    tok.save(d)
    port = free_port()
    guards = tmp_path / "guards.json"
    guards.write_text('{"code_shield": true}')  # herd.safety's pipeline, loaded by --guards (no weights needed)
    proc = subprocess.Popen([sys.executable, "-m", "herd", "serve", str(d), "--port", str(port), "--dtype", "float32",
                             "--max-batch", "4", "--max-model-len", "512", "--threads", "1", "--api-key", "k",
                             "--guards", str(guards)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        statuses = []
        t0 = time.time()
        while time.time() - t0 < 120:
            try:
                statuses.append(httpx.get(url + "/health", timeout=2).status_code)
                if statuses[-1] == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert statuses and statuses[-1] == 200, proc.stderr.read1().decode() if proc.poll() is not None else statuses
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer k"}, timeout=60,
                       json={"model": str(d), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(url + "/").text.startswith("<!doctype html>")
        mod = httpx.post(url + "/v1/moderations", headers={"Authorization": "Bearer k"}, json={"input": ["hello"]})
        assert mod.status_code == 200 and mod.json()["results"][0]["flagged"] is False
        assert "Violent Crimes" in mod.json()["results"][0]["categories"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) in (0, 130)  # 130: interrupted, as after Ctrl-C


def test_a_bad_guard_config_is_a_one_line_error(capsys, tmp_path):
    assert run_cli(["serve", "tiny", "--guards", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("herd serve: error:") and len(err.strip().splitlines()) == 1
