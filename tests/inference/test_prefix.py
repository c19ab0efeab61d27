"""Prefix reuse across requests (herd.inference.cache.PrefixStore through herd.Engine): a prompt
that extends a finished sequence continues from its cached rows, and decodes exactly as a cold
prefill of the whole prompt would (float32: logits to 1e-5, same greedy tokens), including across
iRoPE's chunk boundaries (chunk 16 here) where a chunked layer's ring no longer holds the span."""

from __future__ import annotations

import torch

import herd
from herd.inference.cache import PrefixStore
from herd.inference.sampling import SamplingParams
from tests.conftest import model_config
from tests.greedy import assert_greedy_under

TOL = 1e-5


def _model(vision: bool = False):
    return herd.build_model(model_config(vision=vision), seed=3).eval()


def _greedy(n: int, logprobs: int = 5) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, stop_token_ids=[], logprobs=logprobs)


def _run(engine, prompt, params, **kw):
    """→ (tokens, [top-logprob lists]) of one request."""
    sid = engine.add(prompt, params, **kw)
    events = [e for e in engine.run() if e.seq_id == sid and e.token is not None]
    return [e.token for e in events], [e.top_logprobs for e in events]


def _assert_same(a, b):
    (ta, la), (tb, lb) = a, b
    assert ta == tb
    for x, y in zip(la, lb):
        assert [t for t, _ in x] == [t for t, _ in y]
        assert max(abs(p - q) for (_, p), (_, q) in zip(x, y)) <= TOL


def test_follow_up_turn_reuses_prefix_and_decodes_as_cold_across_chunk_boundary():
    model = _model()
    gen = torch.Generator().manual_seed(0)
    turn1 = torch.randint(0, 400, (20,), generator=gen).tolist()
    warm = herd.Engine(model, max_batch=2, prefix_cache_bytes=1 << 20)
    out1, _ = _run(warm, turn1, _greedy(10))
    assert len(warm.prefix) == 1 and warm.prefix.nbytes > 0
    # turn 2 = turn 1 + its reply + 7 new tokens: positions 29 … 36 cross the chunk boundary at 32
    turn2 = turn1 + out1 + torch.randint(0, 400, (7,), generator=gen).tolist()
    reused = _run(warm, turn2, _greedy(12))
    assert warm.prefix.hits == 1 and warm.prefix.reused_tokens == 29  # 20 + 10 − the unfed last token
    cold = _run(herd.Engine(model, max_batch=2), turn2, _greedy(12))
    _assert_same(reused, cold)
    assert_greedy_under(model, turn2, reused[0], tol=1e-4)  # and both are the plain model's greedy decoding


def test_prefix_is_cut_to_a_chunk_boundary_when_the_ring_moved_on():
    """An entry of 40 positions keeps chunk 32…39 in its chunked rings; a prompt sharing its first 24
    tokens needs positions 16…23 there, which are gone → reuse 16 (a boundary), still exact."""
    model = _model()
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(0, 400, (41,), generator=gen).tolist()
    eng = herd.Engine(model, max_batch=1, prefix_cache_bytes=1 << 20, prefill_chunk=7)
    _run(eng, base, _greedy(0, None))  # max_new_tokens 0: the row holds the 41 prompt tokens
    assert len(eng.prefix) == 1
    prompt = base[:24] + torch.randint(0, 400, (9,), generator=gen).tolist()
    got = _run(eng, prompt, _greedy(6))
    assert eng.prefix.reused_tokens == 16
    _assert_same(got, _run(herd.Engine(model, max_batch=1), prompt, _greedy(6)))
    # the rule itself: same chunk as the entry's end → all of it; boundary → all of it; else cut
    store = PrefixStore(1)
    assert store.usable(40, 35, [16, None]) == 35
    assert store.usable(40, 32, [16, None]) == 32
    assert store.usable(40, 24, [16, None]) == 16
    assert store.usable(30, 24, [16, None]) == 24
    assert store.usable(40, 24, [None]) == 24  # global layers keep everything


def test_prompt_equal_to_a_kept_sequence_prefills_its_last_token_only():
    model = _model()
    prompt = list(range(10, 30))
    eng = herd.Engine(model, max_batch=1, prefix_cache_bytes=1 << 20)
    first = _run(eng, prompt, _greedy(5))  # the row ends at position 23, in the chunk of 19
    again = _run(eng, prompt, _greedy(5))
    assert eng.prefix.reused_tokens == len(prompt) - 1
    _assert_same(first, again)
    _run(eng, prompt, _greedy(16))  # this row ends at 34: its rings hold 32…33, not 16…18
    assert eng.prefix.reused_tokens == 2 * (len(prompt) - 1)
    _run(eng, prompt, _greedy(1))  # the newest equal-prefix row is the 34-position one: cut to 16
    assert eng.prefix.reused_tokens == 2 * (len(prompt) - 1) + 19  # ... unless an older row serves all 19


def test_store_evicts_least_recently_used_under_its_memory_bound():
    model = _model()
    probe = herd.Engine(model, max_batch=1, prefix_cache_bytes=1 << 30)
    _run(probe, list(range(1, 21)), _greedy(1, None))
    one = probe.prefix.nbytes  # one 20-position row
    cfg = model.config.text  # 1 global layer keeps 20 positions, 3 chunked layers the 4 of chunk 16…19
    assert sum(cfg.is_chunked(i) for i in range(4)) == 3
    assert one == (20 + 3 * 4) * cfg.num_key_value_heads * cfg.head_dim * 2 * 4  # k and v, float32
    eng = herd.Engine(model, max_batch=1, prefix_cache_bytes=int(2.5 * one))
    a, b, c = list(range(1, 21)), list(range(101, 121)), list(range(201, 221))
    _run(eng, a, _greedy(1, None))
    _run(eng, b, _greedy(1, None))
    _run(eng, a + [7, 8], _greedy(1, None))  # touches a (reused), then keeps a+[7] as a third row
    assert eng.prefix.hits == 1
    assert len(eng.prefix) == 2 and eng.prefix.nbytes <= 2.5 * one  # b, the least recently used, went
    assert sorted(len(e["tokens"]) for e in eng.prefix.entries.values()) == [20, 22]
    _run(eng, b + [1], _greedy(1, None))
    assert eng.prefix.hits == 1  # b was evicted: no reuse
    _run(eng, c, _greedy(1, None))
    assert eng.prefix.nbytes <= 2.5 * one
    tiny = herd.Engine(model, max_batch=1, prefix_cache_bytes=one // 2)
    _run(tiny, a, _greedy(1, None))
    assert len(tiny.prefix) == 0  # a row larger than the whole budget is not kept


def test_cancelled_sequences_are_not_kept():
    model = _model()
    eng = herd.Engine(model, max_batch=2, prefix_cache_bytes=1 << 20, prefill_chunk=4)
    decoding = eng.add(list(range(1, 9)), _greedy(50, None))
    for _ in range(5):
        eng.step()
    prefilling = eng.add(list(range(100, 140)), _greedy(5, None))
    eng.step()
    assert eng.prefilling is not None and eng.prefilling.id == prefilling  # half-written row
    eng.cancel(decoding)
    eng.cancel(prefilling)
    reasons = {e.seq_id: e.finish_reason for e in eng.run() if e.finish_reason}
    assert reasons == {decoding: "cancelled", prefilling: "cancelled"}
    assert len(eng.prefix) == 0
    got = _run(eng, list(range(100, 140)), _greedy(4))
    assert eng.prefix.hits == 0
    _assert_same(got, _run(herd.Engine(model, max_batch=1), list(range(100, 140)), _greedy(4)))


def test_images_are_reused_only_when_the_features_match():
    model = _model(vision=True)
    cfg = model.config
    gen = torch.Generator().manual_seed(2)
    per = cfg.vision.tokens_per_tile
    prompt = torch.randint(0, 400, (24,), generator=gen).tolist()
    prompt[18:18 + per] = [cfg.image_token_index] * per  # an image in the second chunk (16 … 31)
    px = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen)
    other = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen)
    with torch.no_grad():
        f_px, f_other = model.encode_images(px), model.encode_images(other)
    eng = herd.Engine(model, max_batch=1, prefix_cache_bytes=1 << 20)
    out1, _ = _run(eng, prompt, _greedy(4), image_features=f_px)  # kept: 27 positions, ends in chunk 16…31
    turn2 = prompt + out1 + [5, 6, 7]
    same = _run(eng, turn2, _greedy(4), image_features=f_px.clone())  # equal features, another tensor
    assert eng.prefix.reused_tokens == len(prompt) + 3
    _assert_same(same, _run(herd.Engine(model, max_batch=1), turn2, _greedy(4), image_features=f_px))
    before = eng.prefix.reused_tokens
    diff = _run(eng, turn2, _greedy(4), image_features=f_other)  # same token ids, another image
    # up to the first image token only (from the turn-1 row: the turn-2 row has moved on to chunk 32…)
    assert eng.prefix.reused_tokens - before == 18
    _assert_same(diff, _run(herd.Engine(model, max_batch=1), turn2, _greedy(4), image_features=f_other))
