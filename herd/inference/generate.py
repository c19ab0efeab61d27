"""`herd.generate` / `herd.generate_stream`: generation from token ids, on top of the Engine.

    new = herd.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32)          # greedy
    new = herd.generate(model, ids, max_new_tokens=32, temperature=0.8, top_p=0.9, seed=0)
    for ev in herd.generate_stream(model, ids, tokenizer=tok, max_new_tokens=64):
        print(ev.text, end="", flush=True)

Prompts may differ in length (each keeps its own positions; no padding). Returned token lists
hold the new tokens only, ending with the stop token when one was generated.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterator

import torch

from herd.inference.engine import Engine, Event
from herd.inference.sampling import SamplingParams

_PARAM_NAMES = {f.name for f in fields(SamplingParams)}


@dataclass
class Generation:
    """Everything generated for one prompt."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    finish_reason: str | None = None


def _prompts(input_ids) -> tuple[list[list[int]], bool]:
    """Normalise prompts → (list of token lists, whether a single prompt was given)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            return [input_ids.tolist()], True
        if input_ids.dim() == 2:
            return input_ids.tolist(), False
        raise ValueError(f"input_ids must be 1-D or 2-D, got shape {tuple(input_ids.shape)}")
    if isinstance(input_ids, (list, tuple)) and input_ids and all(isinstance(t, int) for t in input_ids):
        return [list(input_ids)], True
    if isinstance(input_ids, (list, tuple)) and input_ids:
        return [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in input_ids], False
    raise ValueError("input_ids must be token ids: a list of ints, a list of lists, or a 1-D/2-D tensor")


def _images(pixel_values, n: int) -> list:
    if pixel_values is None:
        return [None] * n
    if isinstance(pixel_values, torch.Tensor):
        if n != 1:
            raise ValueError("with several prompts, pass pixel_values as a list (one entry or None per prompt)")
        return [pixel_values]
    pv = list(pixel_values)
    if len(pv) != n:
        raise ValueError(f"pixel_values has {len(pv)} entries for {n} prompts")
    return [torch.cat(p) if isinstance(p, (list, tuple)) else p for p in pv]


def _split_kwargs(kw: dict) -> tuple[SamplingParams, dict]:
    params = {k: kw.pop(k) for k in list(kw) if k in _PARAM_NAMES}
    return SamplingParams(**params), kw


def _engine(model, prompts, params, tokenizer, max_batch, prefill_chunk, kv_dtype, max_seq_len) -> Engine:
    longest = max(len(p) for p in prompts) + params.max_new_tokens
    return Engine(model, max_batch=min(max_batch or len(prompts), len(prompts)), capacity=longest,
                  max_seq_len=max_seq_len, prefill_chunk=prefill_chunk, kv_dtype=kv_dtype, tokenizer=tokenizer)


def generate_stream(model, input_ids, *, pixel_values=None, tokenizer=None, max_batch: int | None = None,
                    prefill_chunk: int | None = 512, kv_dtype=None, max_seq_len: int | None = None,
                    **sampling) -> Iterator[Event]:
    """Stream events (token, text delta, logprob, finish_reason) as they are generated.

    Event.seq_id is the prompt's index. Sampling keywords are SamplingParams' fields
    (max_new_tokens, temperature, top_k, top_p, min_p, frequency_penalty, presence_penalty, seed,
    stop_token_ids, stop, logprobs). Text deltas need `tokenizer`. Closing the iterator early
    (break) stops generation.
    """
    prompts, _ = _prompts(input_ids)
    params, rest = _split_kwargs(dict(sampling))
    if rest:
        raise TypeError(f"generate_stream() got unexpected keyword arguments {sorted(rest)}")
    images = _images(pixel_values, len(prompts))
    engine = _engine(model, prompts, params, tokenizer, max_batch, prefill_chunk, kv_dtype, max_seq_len)
    for i, (p, px) in enumerate(zip(prompts, images)):
        engine.add(p, params, pixel_values=px, seq_id=i)
    yield from engine.run()


def generate(model, input_ids, max_new_tokens: int = 256, temperature: float = 0.0, *, return_details: bool = False,
             **kw) -> list[list[int]] | list[Generation]:
    """Generate for one or several prompts → new token ids per prompt (greedy when temperature is 0).

    input_ids: list[int] | list[list[int]] | LongTensor [T] or [B, T] (rows of a 2-D tensor are
    separate prompts, all used in full). Other keywords: see generate_stream. return_details:
    give Generation objects (tokens, text, logprobs, finish_reason) instead of token lists.
    """
    prompts, _ = _prompts(input_ids)
    results = [Generation() for _ in prompts]
    for ev in generate_stream(model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, **kw):
        g = results[ev.seq_id]
        if ev.token is not None:
            g.tokens.append(ev.token)
            if ev.logprob is not None:
                g.logprobs.append(ev.logprob)
                g.top_logprobs.append(ev.top_logprobs)
        g.text += ev.text
        if ev.finish_reason is not None:
            g.finish_reason = ev.finish_reason
    return results if return_details else [g.tokens for g in results]
