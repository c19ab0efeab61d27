"""Conformance: the official `openai` client against a live herd server (uvicorn on 127.0.0.1).

A tiny random Llama 4 answers; what is checked is the API's shape and its numbers against
independent references (the model's own forward pass for log-probs, the tokenizer for counts).
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from herd.serve import Settings, create_app
from tests.serve.conftest import live_server, make_engine, png_data_url

KEY = "sk-test-key"
USER = [{"role": "user", "content": "Hello, how are you?"}]


@pytest.fixture(scope="module")
def served(tiny):
    app = create_app(Settings(model_name="tiny", api_key=KEY), make_engine(tiny))
    with live_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of the model's logits at every position, from one plain forward pass [T, vocab]."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)


# ----------------------------------------------------------------------------- chat
def test_models_lists_the_model_with_its_context_length(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].model_extra["max_model_len"] == 1024


def test_chat_non_streaming_reports_usage(client, served, tiny):
    r = client.chat.completions.create(model="tiny", messages=USER, max_completion_tokens=6)
    ch = r.choices[0]
    assert r.object == "chat.completion" and ch.message.role == "assistant" and ch.finish_reason in ("stop", "length")
    prompt = httpx.post(served[0] + "/tokenize", json={"messages": USER},
                        headers={"Authorization": f"Bearer {KEY}"}).json()
    assert r.usage.prompt_tokens == prompt["count"]
    assert 1 <= r.usage.completion_tokens <= 6 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_equals_non_stream_and_ends_with_exactly_one_usage_chunk(client):
    full = client.chat.completions.create(model="tiny", messages=USER, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    usage = [c for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0] is chunks[-1] and chunks[-1].choices == []
    assert usage[0].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]


def test_stream_without_usage_option_sends_no_usage(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, stream=True))
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


def test_stop_string_cuts_the_reply(client):
    text = client.chat.completions.create(model="tiny", messages=USER, max_tokens=24, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    cut = len(text) // 2
    stop = text[cut:cut + 3]
    assert len(stop) == 3
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=24, temperature=0, stop=[stop],
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[:text.index(stop)]
    one = client.chat.completions.create(model="tiny", messages=USER, max_tokens=24, temperature=0, stop=stop,
                                         extra_body={"ignore_eos": True})  # a single string, not a list
    assert one.choices[0].message.content == text[:text.index(stop)]


def test_seed_makes_sampling_reproducible(client):
    def sample(seed):
        return client.chat.completions.create(model="tiny", messages=USER, max_tokens=12, temperature=1.0,
                                              seed=seed, extra_body={"ignore_eos": True}).choices[0].message.content

    a, b, c = sample(7), sample(7), sample(8)
    assert a == b and a != c


def test_n_gives_distinct_indexed_choices(client):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=1.0, seed=3, n=3,
                                       extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    assert r.usage.completion_tokens == 24


def test_logprobs_are_the_models_own(client, served, tiny):
    model, tok = tiny
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and all(len(e.top_logprobs) == 3 for e in content)
    prompt = httpx.post(served[0] + "/tokenize", json={"messages": USER},
                        headers={"Authorization": f"Bearer {KEY}"}).json()["tokens"]
    ids = list(prompt)  # the reference: greedy decoding by full forward passes, no cache, no engine
    for e in content:
        ref = _reference_logprobs(model, ids)[-1]
        t = int(ref.argmax())
        assert bytes(e.bytes) == tok.decode_bytes([t])
        assert e.logprob == pytest.approx(float(ref[t]), abs=1e-4)
        top = ref.topk(3)
        assert [x.logprob for x in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        ids.append(t)


def test_five_images_in_one_message_are_encoded_once(client, served):
    app = served[1]
    content = [{"type": "text", "text": "What differs between these?"}] + \
        [{"type": "image_url", "image_url": {"url": png_data_url(i)}} for i in range(5)]
    msgs = [{"role": "user", "content": content}]
    before = app.state.server.image_encodes
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4)
    count = httpx.post(served[0] + "/tokenize", json={"messages": msgs},
                       headers={"Authorization": f"Bearer {KEY}"}).json()["count"]
    assert r.usage.prompt_tokens == count > 5 * 4
    assert app.state.server.image_encodes - before == 5
    # the follow-up turn sends the same images again: their features come from the cache
    msgs2 = msgs + [{"role": "assistant", "content": r.choices[0].message.content or "ok"},
                    {"role": "user", "content": "And the third one?"}]
    client.chat.completions.create(model="tiny", messages=msgs2, max_tokens=4)
    assert app.state.server.image_encodes - before == 5


# ----------------------------------------------------------------------------- completions
def test_completions_echo_gives_prompt_logprobs(client, tiny):
    """What lm-evaluation-harness's local-completions needs for loglikelihood (llama.cpp#27174)."""
    model, tok = tiny
    prompt = "The quick brown fox jumps"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    ids = tok.encode(prompt, bos=True)
    assert r.choices[0].text == tok.decode(ids) and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = _reference_logprobs(model, ids)
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(float(ref[t - 1, ids[t]]), abs=1e-4)
        assert len(lp.top_logprobs[t]) == 2
    assert lp.text_offset == sorted(lp.text_offset)


def test_completions_with_token_ids_echo_and_generation(client, tiny):
    model, tok = tiny
    ids = tok.encode("Hello world", bos=True)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=5, echo=True, logprobs=0, temperature=0,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 5 and r.usage.prompt_tokens == len(ids)
    assert r.choices[0].text.startswith(tok.decode(ids)) and r.choices[0].finish_reason == "length"
    plain = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode(ids) + plain.choices[0].text


def test_min_tokens_and_repetition_penalty_reach_the_sampler(client, tiny):
    from herd.inference import generate

    model, tok = tiny
    ids = tok.encode("Hello world", bos=True)
    first = generate(model, ids, max_new_tokens=1, stop_token_ids=[])[0][0]

    def served(**extra):
        r = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True, **extra})
        return r.choices[0].text, r.usage.completion_tokens

    assert served(stop_token_ids=[first])[1] == 1  # the first token stops the reply…
    held = generate(model, ids, max_new_tokens=6, stop_token_ids=[first], min_tokens=3)[0]
    assert len(held) >= 4 and served(stop_token_ids=[first], min_tokens=3)[1] == len(held)  # …not before 3 more
    for penalty in (1.0, 5.0):
        want = generate(model, ids, max_new_tokens=6, stop_token_ids=[], repetition_penalty=penalty)[0]
        assert served(repetition_penalty=penalty) == (tok.decode(want), 6), penalty


def test_completions_stream_and_batch_prompts(client):
    chunks = list(client.completions.create(model="tiny", prompt=["Hello", "world"], max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert {c.choices[0].index for c in chunks[:-1]} == {0, 1}


# ----------------------------------------------------------------------------- errors
def test_context_overflow_is_a_400_with_its_code(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=10_000)
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "fox " * 1200}])
    assert e.value.code == "context_length_exceeded"


def test_api_key_is_required(served):
    for key in (None, "wrong"):
        c = openai.OpenAI(base_url=served[0] + "/v1", api_key=key or "x", max_retries=0)
        if key is None:
            r = httpx.get(served[0] + "/v1/models")
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            continue
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
    assert httpx.get(served[0] + "/health").status_code == 200  # health needs no key


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=USER, max_tokens=2)
    assert e.value.code == "model_not_found"


@pytest.mark.parametrize("body,param", [
    ({"messages": USER, "temperature": 5}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": USER, "n": 0}, "n"),
    ({"messages": USER, "repetition_penalty": 0}, "repetition_penalty"),
    ({"messages": USER, "max_tokens": 3, "min_tokens": 4}, "min_tokens"),
    ({"messages": USER, "repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"messages": USER, "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
     "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                  "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, "messages"),
])
def test_client_mistakes_are_400_in_openai_shape(served, body, param):
    r = httpx.post(served[0] + "/v1/chat/completions", json={"model": "tiny", **body},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert param in (err["param"] or "")


def test_malformed_json_is_400(served):
    r = httpx.post(served[0] + "/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_limits_give_413_and_429(tiny):
    app = create_app(Settings(model_name="tiny", max_image_bytes=200, max_body_bytes=50_000, max_queue=0),
                     make_engine(tiny, max_batch=2))
    with live_server(app) as url:
        big = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(0)}}]}]
        r = httpx.post(url + "/v1/chat/completions", json={"messages": big})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 60_000}]})
        assert r.status_code == 413
        r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "n": 3, "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"


def test_health_is_503_while_loading_then_200(tiny):
    app = create_app(Settings(model_name="tiny"))
    with live_server(app) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert httpx.get(url + "/v1/models").status_code == 503
        app.state.server.attach(make_engine(tiny))
        assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_tokenize_detokenize_round_trip(served, tiny):
    h = {"Authorization": f"Bearer {KEY}"}
    ids = httpx.post(served[0] + "/tokenize", json={"prompt": "Hello world"}, headers=h).json()["tokens"]
    assert ids == tiny[1].encode("Hello world", bos=True)
    assert httpx.post(served[0] + "/detokenize", json={"tokens": ids}, headers=h).json()["prompt"] == \
        "<|begin_of_text|>Hello world"
    assert httpx.post(served[0] + "/detokenize", json={"tokens": [10 ** 6]}, headers=h).status_code == 400


def test_metrics_count_what_was_served(served):
    text = httpx.get(served[0] + "/metrics").text
    for name in ("herd_time_to_first_token_seconds_count", "herd_inter_token_latency_seconds_count",
                 "herd_num_requests_running", "herd_num_requests_waiting", "herd_generation_tokens_total",
                 "herd_generation_tokens_per_second", "herd_guard_verdicts"):
        assert name in text
    ttft = [ln for ln in text.splitlines() if ln.startswith("herd_time_to_first_token_seconds_count")]
    assert float(ttft[0].split()[-1]) > 0


def test_an_error_after_the_stream_started_is_an_event_then_done(tiny):
    from tests.serve.conftest import ScriptedEngine

    app = create_app(Settings(model_name="tiny"), ScriptedEngine(tiny, "never sent", fail=True))
    with live_server(app) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json={"messages": USER, "stream": True}) as r:
            assert r.status_code == 200
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        err = json.loads(lines[-2][6:])["error"]
        assert err["type"] == "server_error" and "scripted failure" in err["message"]


def test_unknown_fields_are_accepted_and_ignored(served):
    h = {"Authorization": f"Bearer {KEY}"}
    for path, body in (("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "Hello"})):
        r = httpx.post(served[0] + path, headers=h, json={**body, "max_tokens": 2, "store": True, "metadata": {"a": 1},
                                                          "some_future_field": [1, 2]})
        assert r.status_code == 200, r.text
