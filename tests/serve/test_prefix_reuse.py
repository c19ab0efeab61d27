"""A chat's follow-up turn reuses the previous turn's cached prefix (herd.Engine's prefix store,
switched on by `herd serve --prefix-cache-mb`): the reply is the one a cold server gives, and
/metrics counts the hit and the tokens that were not prefilled again."""

from __future__ import annotations

import re

import httpx
import pytest

import herd
from herd.serve import Settings, create_app
from tests.serve.conftest import live_server, png_data_url


def _engine(tiny, prefix_bytes: int):
    model, tok = tiny
    return herd.Engine(model, max_batch=4, max_seq_len=1024, tokenizer=tok, prefill_chunk=64,
                       prefix_cache_bytes=prefix_bytes)


def _counter(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def _conversation(url: str) -> tuple[list[dict], str, int]:
    """Turn 1 (two images) then turn 2 → (turn-2 reply's top logprobs, its text, turn-1 prompt tokens)."""
    images = [{"type": "image_url", "image_url": {"url": png_data_url(i)}} for i in range(2)]
    turn1 = [{"role": "user", "content": [{"type": "text", "text": "What are these?"}, *images]}]
    body = {"max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    r1 = httpx.post(url + "/v1/chat/completions", json={"messages": turn1, **body}, timeout=60).json()
    conv = turn1 + [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
                    {"role": "user", "content": "And the second one?"}]
    r2 = httpx.post(url + "/v1/chat/completions", json={"messages": conv, **body}, timeout=60).json()
    assert r1["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert (cached >= r1["usage"]["prompt_tokens"]) if "prefix_cache" in httpx.get(url + "/metrics").text else cached == 0
    return r2["choices"][0]["logprobs"]["content"], r2["choices"][0]["message"]["content"], r1["usage"]["prompt_tokens"]


def test_follow_up_turn_hits_the_prefix_cache_and_answers_as_a_cold_server(tiny):
    warm_app = create_app(Settings(model_name="tiny"), _engine(tiny, 64 << 20))
    with live_server(warm_app) as url:
        warm, warm_text, p1 = _conversation(url)
        metrics = httpx.get(url + "/metrics").text
    assert _counter(metrics, "herd_prefix_cache_queries_total") == 2
    assert _counter(metrics, "herd_prefix_cache_hits_total") == 1
    assert _counter(metrics, "herd_prefix_cache_reused_tokens_total") >= p1  # turn 1's prompt, images included
    cold_app = create_app(Settings(model_name="tiny"), _engine(tiny, 0))
    with live_server(cold_app) as url:
        cold, cold_text, _ = _conversation(url)
        assert "herd_prefix_cache" not in httpx.get(url + "/metrics").text  # off: nothing exported
    assert warm_text == cold_text
    for a, b in zip(warm, cold):
        assert a["token"] == b["token"] and a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)


def test_one_stream_decodes_on_the_batch1_step_and_many_on_the_batched_forward(tiny):
    """Concurrency 1 in the server takes the engine's batch-1 decode step (herd.inference.single,
    native kernels where they load) although the cache has rows for 4; two streams at once decode
    as one batched forward."""
    engine = _engine(tiny, 0)
    assert engine.decoder is not None
    single = []
    decoder = engine.decoder
    engine.decoder = lambda tok, cache: single.append(1) or decoder(tok, cache)  # the engine's own step, counted
    app = create_app(Settings(model_name="tiny"), engine)
    body = {"prompt": "Hello world", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with live_server(app) as url:
        one = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        assert one["usage"]["completion_tokens"] == 6 and len(single) == 5  # every decode step of the lone stream
        single.clear()
        two = httpx.post(url + "/v1/completions", json={**body, "n": 2}, timeout=60).json()
    assert two["usage"]["completion_tokens"] == 12
    # the rows decode together; one is alone only while the other prefills and after the other ends
    assert len(single) <= 2
