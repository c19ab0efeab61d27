"""The batched decode step (herd.inference.batched) against the general forward and the full model."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.inference.batched import BatchDecoder
from herd.inference.cache import KVCache
from herd.inference.engine import Engine, forward_step
from herd.inference.fast import optimize_for_inference
from herd.inference.quant import quantize_model
from herd.inference.sampling import SamplingParams
from tests.conftest import model_config
from tests.greedy import assert_greedy_under

# chunk 16, NoPE every 4th layer, temperature tuning, QK-norm, 4 experts (tests.conftest.text_config)
PROMPTS = [5, 14, 15, 16, 17, 31, 33]  # rows on both sides of the chunk boundaries 16 and 32
STEPS = 12


def _model(dtype=torch.float32, **over):
    return herd.build_model(model_config(vision=False, text=over), seed=1, dtype=dtype).eval()


def _prompts(n=len(PROMPTS), seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 500, (PROMPTS[i % len(PROMPTS)],), generator=g).tolist() for i in range(n)]


def _run(model, prompts, feed, batch_decoder=None, kv_dtype=None):
    """Prefill each prompt into its own row, then STEPS decode steps over all rows at once, feeding
    feed[step] [B, 1] → logits of each decode step [STEPS, B, vocab] (float32)."""
    B = len(prompts)
    cache = KVCache.for_model(model, B, 8, kv_dtype=kv_dtype)  # small: the cache grows on the way
    out = []
    with torch.inference_mode():
        for r, p in enumerate(prompts):
            forward_step(model, torch.tensor([p]), cache.select(r, 1))
        for t in range(STEPS):
            out.append(forward_step(model, feed[t], cache.select(0, B), batch_decoder=batch_decoder).float())
    return torch.stack(out)


def _feed(B, seed=4):
    return torch.randint(0, 500, (STEPS, B, 1), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("over", [{}, dict(interleave_moe_layer_step=2), dict(use_qk_norm=False, attention_bias=True),
                                  dict(tie_word_embeddings=True), dict(num_experts_per_tok=2)])
def test_batched_step_equals_the_general_path_and_the_full_forward(over):
    model = _model(**over)
    fast = optimize_for_inference(model)
    decoder = BatchDecoder.for_model(fast)
    prompts, feed = _prompts(), _feed(len(PROMPTS))
    calls = []
    got = _run(fast, prompts, feed, lambda ids, cache: calls.append(ids.shape[0]) or decoder(ids, cache))
    assert calls == [len(PROMPTS)] * STEPS  # every decode step took the batched path
    want = _run(fast, prompts, feed)  # the general forward (Llama4.hidden_states over the same cache)
    assert (got - want).abs().max().item() <= 1e-5
    with torch.no_grad():  # the independent reference: each row's whole sequence through the trainable model
        for r, p in enumerate(prompts):
            full = model(torch.tensor([p + feed[:, r, 0].tolist()])).float()[0, len(p):]  # [STEPS, vocab]
            assert (got[:, r] - full).abs().max().item() <= 1e-4, r


@pytest.mark.parametrize("over", [{}, dict(interleave_moe_layer_step=2)])
def test_one_forward_for_decode_rows_and_prompt_segments_equals_separate_forwards(over):
    """BatchDecoder.step: three rows decoding, a prompt continuing across the chunk boundaries 16 and
    32 and a new prompt, in one forward — the logits and the cache the separate forwards give."""
    fast = optimize_for_inference(_model(**over))
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (5, 17, 30, 10)]
    more, new = torch.randint(0, 500, (25,), generator=g).tolist(), torch.randint(0, 500, (7,), generator=g).tolist()
    caches = [KVCache.for_model(fast, 5, 8) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            for r, p in enumerate(prompts):
                forward_step(fast, torch.tensor([p]), cache.select(r, 1))
        dec = [11, 12, 13]
        got = BatchDecoder(fast).step(caches[0], dec, [(3, more, None), (4, new, None)]).float()
        want = torch.cat([forward_step(fast, torch.tensor(dec)[:, None], caches[1].select(0, 3)),
                          forward_step(fast, torch.tensor([more]), caches[1].select(3, 1)),
                          forward_step(fast, torch.tensor([new]), caches[1].select(4, 1))]).float()
        assert got.shape == (5, fast.config.text.vocab_size)
        assert (got - want).abs().max().item() <= 1e-5
        assert caches[0].lengths == caches[1].lengths == [6, 18, 31, 35, 7]
        nxt = torch.tensor([[1], [2], [3], [4], [5]])  # one more step on every row: the caches hold the same
        a = BatchDecoder(fast)(nxt, caches[0].select(0, 5)).float()
        b = forward_step(fast, nxt, caches[1].select(0, 5)).float()
        assert (a - b).abs().max().item() <= 1e-5


def test_batched_step_keeps_the_load_balancing_bias():
    model = _model()
    for moe in model.moe_layers():
        moe.expert_bias.copy_(torch.tensor([0.0, 0.5, -0.5, 1.0]))  # changes which experts are chosen
    fast = optimize_for_inference(model)
    prompts, feed = _prompts(), _feed(len(PROMPTS))
    got = _run(fast, prompts, feed, BatchDecoder(fast))
    assert (got - _run(fast, prompts, feed)).abs().max().item() <= 1e-5
    with torch.no_grad():
        p = prompts[-1]
        full = model(torch.tensor([p + feed[:, -1, 0].tolist()])).float()[0, len(p):]
    assert (got[:, -1] - full).abs().max().item() <= 1e-4


def test_batched_step_in_bf16_with_int8_kv_cache_and_quantized_weights():
    model = _model(torch.bfloat16)
    prompts, feed = _prompts(5), _feed(5)
    for prepared in (optimize_for_inference(model), quantize_model(model, bits=8, group_size=32)):
        for kv in (None, "int8"):
            got = _run(prepared, prompts, feed, BatchDecoder(prepared), kv)
            want = _run(prepared, prompts, feed, None, kv)
            # the same roundings except expert products over another number of rows (no padding)
            assert (got - want).abs().max().item() <= 0.05
            assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.95


def test_engine_decodes_on_the_batched_step_with_rows_joining_and_leaving():
    """Greedy decodings through herd.Engine (rows prefilled over several steps, rows finishing at
    different lengths and the last row moving into their place) are the reference model's."""
    model = _model()
    prompts = _prompts(9)
    lengths = [3, 20, 7, 1, 14, 9, 20, 2, 11]
    runs = {}
    for batch_step in (True, False):
        engine = Engine(model, max_batch=6, prefill_chunk=24, batch_step=batch_step)
        rows = []  # per step: (decode rows, prompt segments) in the one forward
        if batch_step:
            step = engine.batch_decoder.step
            engine.batch_decoder.step = lambda cache, dec, segs, tok: rows.append((len(dec), len(segs))) or step(
                cache, dec, segs, tok)
        sids = [engine.add(p, SamplingParams(max_new_tokens=n, stop_token_ids=[])) for p, n in zip(prompts, lengths)]
        out = {sid: [] for sid in sids}
        for ev in engine.run():
            if ev.token is not None:
                out[ev.seq_id].append(ev.token)
        runs[batch_step] = [out[sid] for sid in sids]
        if batch_step:
            decode = [d for d, _ in rows]
            # every step but those with one running row alone (the batch-1 step) went through it
            assert engine.steps - 8 <= len(rows) < engine.steps and max(decode) == 6 and len(set(decode)) > 3
            assert any(d and s for d, s in rows)  # prompts prefilled in the same forward as running rows
            assert any(s > 1 for _, s in rows)  # several prompts in one forward
    assert runs[True] == runs[False]
    for p, n, tokens in zip(prompts, lengths, runs[True]):
        assert len(tokens) == n
        assert_greedy_under(model, p, tokens, tol=1e-4)


def test_batched_step_refuses_what_it_cannot_run():
    fast = optimize_for_inference(_model())
    cache = KVCache.for_model(fast, 3, 8)
    with pytest.raises(ValueError, match="one token per selected cache row"):
        BatchDecoder(fast)(torch.zeros(2, 1, dtype=torch.long), cache)
    assert BatchDecoder.for_model(_model()) is None  # a trainable model: the general forward runs
    with pytest.raises(ValueError, match="prepared for inference"):
        BatchDecoder(_model())


def test_a_failed_step_changes_nothing_and_the_engine_goes_on():
    """An exception inside the forward (out of memory, a bug) leaves the rows, the prompt being
    prefilled and the queue as they were: the next steps give the decodings of a run without it."""
    model = _model()
    prompts = _prompts(5)

    def run(fail_at):
        engine = Engine(model, max_batch=3, prefill_chunk=20)
        step, calls = engine.batch_decoder.step, []

        def flaky(*a):
            calls.append(1)
            if len(calls) == fail_at:
                raise RuntimeError("injected")
            return step(*a)

        engine.batch_decoder.step = flaky
        sids = [engine.add(p, SamplingParams(max_new_tokens=6, stop_token_ids=[])) for p in prompts]
        out = {sid: [] for sid in sids}
        while engine.has_work():
            try:
                events = engine.step()
            except RuntimeError:
                continue
            for ev in events:
                if ev.token is not None:
                    out[ev.seq_id].append(ev.token)
        return [out[sid] for sid in sids]

    clean = run(fail_at=0)
    assert all(len(t) == 6 for t in clean)
    for fail_at in (1, 2, 4):  # the first prompts' step, one with a prompt half prefilled, one with rows decoding
        assert run(fail_at) == clean, fail_at


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_of_very_different_lengths_attend_without_padding_to_the_longest(dtype):
    """A 60-token row among 3–5-token rows: each row attends over its own keys (herd's native
    single-query attention per row where it loads) instead of all being padded to 60 and masked."""
    model = _model(dtype)
    fast = optimize_for_inference(model)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (3, 60, 4, 5)]
    feed = _feed(4, seed=7)
    cache = KVCache.for_model(fast, 4, 64)
    with torch.inference_mode():
        for r, p in enumerate(prompts):
            forward_step(fast, torch.tensor([p]), cache.select(r, 1))
        plan = cache.plan(torch.tensor([[3], [60], [4], [5]]), 0, 4)
        assert plan["keys"][None] == [4, 61, 5, 6] and plan["ragged"][None] and not plan["ragged"][16]
    got = _run(fast, prompts, feed, BatchDecoder(fast))
    with torch.no_grad():
        for r, p in enumerate(prompts):
            full = model(torch.tensor([p + feed[:, r, 0].tolist()])).float()[0, len(p):]
            assert (got[:, r] - full).abs().max().item() <= (1e-4 if dtype == torch.float32 else 0.1), r
