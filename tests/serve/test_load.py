"""Load on loopback: 64 concurrent streaming clients all finish with their own text; killing half of
32 streams mid-reply frees their engine rows while the rest finish."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from herd.serve import Settings, create_app
from tests.serve.conftest import live_server, make_engine

PROMPTS = [f"Hello {w}, how are you?" for w in ("fox", "dog", "world", "today", "quick", "lazy", "brown", "over")]


async def _stream(client, url, prompt, max_tokens, stop_after=None):
    """→ (chat id, text, finish_reason, chunks); closes the connection after `stop_after` content chunks."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True}
    ids, text, finish, n = set(), "", None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            ids.add(c["id"])
            ch = c["choices"][0]
            text += ch["delta"].get("content") or ""
            finish = ch["finish_reason"] or finish
            n += 1
            if stop_after is not None and n >= stop_after:
                break  # leaving the block closes the connection mid-stream
    return ids, text, finish, n


def test_64_concurrent_streams_all_finish_unmixed(tiny):
    app = create_app(Settings(model_name="tiny"), make_engine(tiny, max_batch=64))
    with live_server(app) as url:
        async def main():
            async with httpx.AsyncClient(timeout=120) as c:
                alone = [await _stream(c, url, p, 12) for p in PROMPTS]  # each prompt alone, first
                t0 = time.perf_counter()
                together = await asyncio.gather(*[_stream(c, url, PROMPTS[i % 8], 12) for i in range(64)])
                return alone, together, time.perf_counter() - t0

        alone, together, elapsed = asyncio.run(main())
    assert elapsed < 120
    assert len({next(iter(ids)) for ids, *_ in together}) == 64  # 64 distinct completions
    for i, (ids, text, finish, _) in enumerate(together):
        assert len(ids) == 1 and finish == "length"
        assert text == alone[i % 8][1], f"stream {i} differs from its prompt run alone"


def test_killing_half_the_streams_frees_their_rows(tiny):
    app = create_app(Settings(model_name="tiny"), make_engine(tiny, max_batch=32))
    server = app.state.server
    with live_server(app) as url:
        async def main():
            async with httpx.AsyncClient(timeout=120) as c:
                tasks = [_stream(c, url, PROMPTS[i % 8], 200 if i % 2 else 40, stop_after=3 if i % 2 else None)
                         for i in range(32)]
                return await asyncio.gather(*tasks)

        results = asyncio.run(main())
        kept = [r for i, r in enumerate(results) if i % 2 == 0]
        killed = [r for i, r in enumerate(results) if i % 2 == 1]
        assert all(r[2] == "length" and r[3] >= 40 for r in kept)
        assert all(r[2] is None for r in killed)
        t0 = time.time()
        while server.loop.in_flight and time.time() - t0 < 10:
            time.sleep(0.05)
        assert server.loop.in_flight == 0 and not server.engine.active and not server.engine.waiting
        metrics = httpx.get(url + "/metrics").text
        assert 'herd_request_success_total{finished_reason="cancelled"} 16.0' in metrics
        # the killed streams did not run to their 200 tokens
        generated = float(next(ln.split()[-1] for ln in metrics.splitlines()
                               if ln.startswith("herd_generation_tokens_total")))
        assert generated < 16 * 40 + 16 * 100


def test_a_non_streaming_client_that_leaves_is_cancelled(tiny):
    from tests.serve.conftest import ScriptedEngine

    engine = ScriptedEngine(tiny, "word " * 300, delay=0.02)
    app = create_app(Settings(model_name="tiny"), engine)
    server = app.state.server
    with live_server(app) as url:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/v1/chat/completions", timeout=0.5,
                       json={"messages": [{"role": "user", "content": "hi"}]})
        t0 = time.time()
        while server.loop.in_flight and time.time() - t0 < 5:
            time.sleep(0.05)
        assert server.loop.in_flight == 0 and not engine.active
        assert time.time() - t0 < 3  # well before the 300-token reply would have finished (~6 s)
