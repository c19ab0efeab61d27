"""Fixtures for the server tests: a tiny random multimodal Llama 4 with a byte-level BPE trained to
match its special ids, and live uvicorn servers on 127.0.0.1 (free ports), stopped by the tests."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

import herd
from tests.conftest import model_config

CORPUS = ["The quick brown fox jumps over the lazy dog. " * 40, "Hello world, how are you today? " * 40,
          "get_weather(city=\"Paris\") [ ] ( ) { } : , = \" 0123456789 " * 20]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs torch on one thread (tests.conftest.one_thread)."""


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(model, tokenizer): random weights, vocab 512, 28-px tiles of 4 tokens, float32."""
    from herd.tokenizer_train import train_tokenizer

    d = tmp_path_factory.mktemp("serve_model")
    tok = train_tokenizer(CORPUS, vocab_size=512, out_dir=d / "tok")
    cfg = model_config(vision=True, text=dict(intermediate_size=64, intermediate_size_mlp=128))
    assert tok.special_tokens["<|patch|>"] == cfg.image_token_index
    model = herd.build_model(cfg, seed=1).eval()
    return model, tok


def make_engine(tiny, max_batch=8, max_seq_len=1024):
    model, tok = tiny
    return herd.Engine(model, max_batch=max_batch, max_seq_len=max_seq_len, tokenizer=tok, prefill_chunk=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app):
    """Run `app` with uvicorn on 127.0.0.1:<free port> in a thread → base URL; stopped on exit."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.time()
    while not server.started:
        if time.time() - t0 > 20 or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.server.close()


def png_data_url(seed: int, size=(40, 60)) -> str:
    arr = (np.random.default_rng(seed).random((*size, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class ScriptedEngine:
    """A stand-in for herd.Engine that "generates" a fixed text then <|eot|>, one token per step, with
    the real Event/TextStream types. For tests of what the server does with a reply (tool-call parsing,
    streaming, failures) that a random model would never write. fail=True: step() raises."""

    def __init__(self, tiny, script: str, fail: bool = False, max_batch: int = 8, delay: float = 0.0):
        from herd.inference.text import TextStream

        self.model, self.tokenizer = tiny
        self.max_seq_len, self.max_batch = 4096, max_batch
        self.script = self.tokenizer.encode(script) + [self.tokenizer.special_tokens["<|eot|>"]]
        self.fail, self.delay = fail, delay
        self.active, self.prefilling = [], None
        self.prompts: list[list[int]] = []
        self._new, self._cancel, self._lock = [], set(), threading.Lock()
        self._stream = TextStream

    def add(self, prompt, params, *, pixel_values=None, image_features=None, seq_id=None):
        with self._lock:
            self._new.append({"id": seq_id, "pos": 0, "text": self._stream(self.tokenizer, params.stop)})
            self.prompts.append(list(prompt))
        return seq_id

    def cancel(self, seq_id):
        with self._lock:
            self._cancel.add(seq_id)

    def has_work(self):
        with self._lock:
            return bool(self._new or self._cancel) or bool(self.active)

    def step(self):
        from herd.inference.engine import Event

        with self._lock:
            self.active += self._new
            self._new, cancel, self._cancel = [], self._cancel, set()
        if self.fail and self.active:
            raise RuntimeError("scripted failure")
        if self.delay and self.active:
            time.sleep(self.delay)  # a slow model, so a browser can watch the stream and stop it
        events = []
        for s in list(self.active):
            if s["id"] in cancel:
                events.append(Event(s["id"], None, finish_reason="cancelled"))
                self.active.remove(s)
                continue
            t = self.script[s["pos"]]
            s["pos"] += 1
            last = s["pos"] == len(self.script)
            text = s["text"].finish() if last else s["text"].push(t)
            reason = "stop" if last or s["text"].stopped else None
            events.append(Event(s["id"], t, text, None, None, reason))
            if reason:
                self.active.remove(s)
        return events
