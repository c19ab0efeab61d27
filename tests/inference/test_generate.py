"""generate / generate_stream / Engine / Session on random models.

Oracles: transformers' `generate` on the same weights (greedy, text-only CausalLM), and herd's own
full forward (no cache) for everything else — images included.
"""

from __future__ import annotations

import pytest
import torch

import herd
from herd.inference import Engine, SamplingParams, Session, generate, generate_stream
from tests.conftest import load_transformers, model_config

CHUNKY = dict(vision=False)  # chunk 16, NoPE every 4th layer, temperature tuning from position 3
VARIANT = dict(vision=False, text=dict(interleave_moe_layer_step=2, num_experts_per_tok=2, use_qk_norm=False,
                                       tie_word_embeddings=True, attention_chunk_size=8))


class CharTokenizer:
    """A stand-in tokenizer: id i is one letter; ids 100/101 are the two UTF-8 bytes of 'é'."""

    vocab_size = 512

    def decode_bytes(self, ids):
        table = {100: b"\xc3", 101: b"\xa9"}
        return b"".join(table.get(i, bytes([97 + i % 26])) for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _model(kind=CHUNKY, seed=1, **over):
    cfg = model_config(**kind, **over)
    return herd.build_model(cfg, seed=seed).eval()


def _prompts(lengths, seed=0, vocab=500):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _greedy_full_forward(model, ids, n, pixel_values=None):
    """Reference: greedy decoding by re-running the full forward (no cache) each step."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), pixel_values=pixel_values)[0, -1]
            t = int(logits.argmax())
            out.append(t)
            ids.append(t)
    return out


@pytest.mark.parametrize("kind", [CHUNKY, VARIANT], ids=["chunked_nope_temp", "top2_tied_chunk8"])
def test_greedy_matches_transformers_generate(kind, tmp_path):
    model = _model(kind)
    herd.save_model(model, tmp_path)
    hf = load_transformers(tmp_path, multimodal=False)
    prompts = _prompts([5, 17, 30])
    n = 40  # prompt + 40 crosses several chunk boundaries and the temperature steps
    ours = generate(model, prompts, max_new_tokens=n, stop_token_ids=[])
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)[0, len(p):].tolist()
        assert o == ref


def test_batched_equals_one_at_a_time():
    model = _model()
    prompts = _prompts([3, 20, 9, 33, 1])
    for kw in (dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, top_k=50, seed=7)):
        batched = generate(model, prompts, max_new_tokens=25, stop_token_ids=[], max_batch=3, prefill_chunk=7, **kw)
        single = [generate(model, [p], max_new_tokens=25, stop_token_ids=[], **kw)[0] for p in prompts]
        assert batched == single
        assert len({tuple(b) for b in batched}) == len(prompts)


def test_prefill_chunk_does_not_change_tokens():
    model = _model()
    p = _prompts([45])[0]
    runs = [generate(model, p, max_new_tokens=12, stop_token_ids=[], prefill_chunk=c)[0] for c in (1, 5, 16, None)]
    assert all(r == runs[0] for r in runs)
    assert runs[0] == _greedy_full_forward(model, p, 12)


def test_engine_adds_and_removes_sequences_between_steps():
    model = _model()
    a, b, c, d = _prompts([12, 30, 4, 8], seed=3)
    params = SamplingParams(max_new_tokens=15, stop_token_ids=[])
    engine = Engine(model, max_batch=2, prefill_chunk=8, capacity=8)
    out = {}

    def collect(events):
        for ev in events:
            o = out.setdefault(ev.seq_id, {"tokens": [], "finish": None})
            if ev.token is not None:
                o["tokens"].append(ev.token)
            o["finish"] = ev.finish_reason or o["finish"]

    engine.add(a, params, seq_id="a")
    for _ in range(4):
        collect(engine.step())
    engine.add(b, params, seq_id="b")
    engine.add(c, SamplingParams(max_new_tokens=50, stop_token_ids=[]), seq_id="c")
    engine.add(d, SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, stop_token_ids=[]), seq_id="d")
    for _ in range(9):
        collect(engine.step())
    assert engine.max_batch == 2 and len(engine.active) <= 2
    engine.cancel("c")
    for ev in engine.run():
        collect([ev])
    assert out["a"]["tokens"] == generate(model, a, max_new_tokens=15, stop_token_ids=[])[0]
    assert out["b"]["tokens"] == generate(model, b, max_new_tokens=15, stop_token_ids=[])[0]
    assert out["d"]["tokens"] == generate(model, d, max_new_tokens=6, temperature=1.0, seed=3, stop_token_ids=[])[0]
    assert out["a"]["finish"] == out["b"]["finish"] == out["d"]["finish"] == "length"
    assert out["c"]["finish"] == "cancelled" and len(out["c"]["tokens"]) < 50
    assert not engine.has_work() and engine.active == []


def test_image_prompt_generation_matches_full_forward():
    model = _model(dict(vision=True))
    cfg = model.config
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 380, (30,), generator=g)
    ids[5:5 + 2 * cfg.vision.tokens_per_tile] = cfg.image_token_index
    px = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ours = generate(model, ids, max_new_tokens=20, pixel_values=px, stop_token_ids=[], prefill_chunk=7)[0]
    assert ours == _greedy_full_forward(model, ids.tolist(), 20, px)
    assert ours != generate(model, ids, max_new_tokens=20, pixel_values=torch.zeros_like(px), stop_token_ids=[])[0]
    with pytest.raises(ValueError, match="image tokens"):
        generate(model, ids, max_new_tokens=2, pixel_values=px[:1])


def test_stop_tokens_and_max_new_tokens():
    model = _model()
    p = _prompts([10])[0]
    free = generate(model, p, max_new_tokens=20, stop_token_ids=[], return_details=True)[0]
    assert len(free.tokens) == 20 and free.finish_reason == "length"
    stop = free.tokens[6]
    first = free.tokens.index(stop)
    got = generate(model, p, max_new_tokens=20, stop_token_ids=[stop], return_details=True)[0]
    assert got.tokens == free.tokens[:first + 1] and got.finish_reason == "stop"
    # default stop ids: the model's eos ids
    model.config.text.eos_token_id = [stop]
    assert generate(model, p, max_new_tokens=20)[0] == free.tokens[:first + 1]
    assert generate(model, p, max_new_tokens=0) == [[]]


def test_logprobs_are_the_models_own():
    model = _model()
    p = _prompts([12])[0]
    g = generate(model, p, max_new_tokens=8, stop_token_ids=[], temperature=0.7, seed=1, logprobs=3,
                 return_details=True)[0]
    with torch.no_grad():
        logits = model(torch.tensor([p + g.tokens]))[0, len(p) - 1:-1]
    ref = torch.log_softmax(logits, -1)
    assert len(g.logprobs) == 8
    for t, (tok, lp, top) in enumerate(zip(g.tokens, g.logprobs, g.top_logprobs)):
        assert abs(lp - ref[t, tok].item()) < 1e-4
        want = ref[t].topk(3)
        assert [i for i, _ in top] == want.indices.tolist()
        assert max(abs(a - b) for (_, a), b in zip(top, want.values.tolist())) < 1e-4


def test_stream_text_deltas_and_stop_strings():
    model = _model()
    tok = CharTokenizer()
    p = _prompts([6])[0]
    events = list(generate_stream(model, p, tokenizer=tok, max_new_tokens=30, stop_token_ids=[]))
    tokens = [e.token for e in events]
    text = "".join(e.text for e in events)
    assert text == tok.decode(tokens) and events[-1].finish_reason == "length"
    stop = text[10:13]
    cut = text.index(stop)
    events = list(generate_stream(model, p, tokenizer=tok, max_new_tokens=30, stop_token_ids=[], stop=[stop, "zzzz"]))
    got = "".join(e.text for e in events)
    assert got == text[:cut] and events[-1].finish_reason == "stop"  # nothing of the stop string leaks


def test_session_reuses_the_cached_prefix():
    model = _model()
    first, more = _prompts([20, 9], seed=5)
    s = Session(model, prefill_chunk=6, capacity=8)
    params = SamplingParams(max_new_tokens=10, stop_token_ids=[])
    reply = [e.token for e in s.generate(first, params)]
    assert reply == generate(model, first, max_new_tokens=10, stop_token_ids=[])[0]
    prompt2 = first + reply + more
    reply2 = [e.token for e in s.generate(prompt2, params)]
    assert s.reused == len(first) + len(reply) - 1  # all but the last reply token was already cached
    assert reply2 == generate(model, prompt2, max_new_tokens=10, stop_token_ids=[])[0]
    # a prompt that diverges early (inside the first chunk) is rebuilt, and still right
    prompt3 = first[:3] + more
    reply3 = [e.token for e in s.generate(prompt3, params)]
    assert s.reused == 0
    assert reply3 == generate(model, prompt3, max_new_tokens=10, stop_token_ids=[])[0]


def test_session_survives_an_interrupted_reply():
    model = _model()
    p = _prompts([15], seed=6)[0]
    s = Session(model)
    params = SamplingParams(max_new_tokens=10, stop_token_ids=[])
    gen = s.generate(p, params)
    partial = [next(gen).token for _ in range(4)]
    gen.close()  # the consumer stopped (Ctrl-C in `herd chat`)
    again = [e.token for e in s.generate(p + partial, params)]
    assert partial + again[:6] == generate(model, p, max_new_tokens=10, stop_token_ids=[])[0]


def test_bad_inputs_raise_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [1, 2, 10_000], max_new_tokens=2)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        generate(model, [1, 2], max_new_tokens=2, stop=["x"])
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1, 2], max_new_tokens=2, top_p=0.0)


def test_short_prompts_share_a_steps_prefill_budget():
    """prefill_chunk bounds the prompt tokens of a step, not the prompts: four 8-token prompts join
    the batch in one step under a budget of 32; a 40-token prompt then takes the next two steps
    (32 + 8 tokens) — and every sequence decodes as it does alone."""
    model = _model()
    short = _prompts([8, 8, 8, 8], seed=5)
    long = _prompts([40], seed=6)[0]
    params = SamplingParams(max_new_tokens=6, stop_token_ids=[])
    engine = Engine(model, max_batch=5, prefill_chunk=32)
    for i, p in enumerate(short):
        engine.add(p, params, seq_id=i)
    engine.add(long, params, seq_id="long")
    events = engine.step()
    assert len(engine.active) == 4 and engine.prefilling is None and len(engine.waiting) == 1  # budget spent
    events += engine.step()
    assert engine.prefilling is not None and engine.prefilling.prefilled == 32
    events += engine.step()
    assert engine.prefilling is None and len(engine.active) == 5
    out: dict = {}
    for ev in events + list(engine.run()):
        if ev.token is not None:
            out.setdefault(ev.seq_id, []).append(ev.token)
    for i, p in enumerate(short):
        assert out[i] == generate(model, p, max_new_tokens=6, stop_token_ids=[])[0]
    assert out["long"] == generate(model, long, max_new_tokens=6, stop_token_ids=[])[0]
