"""Continuous batching: sequences join and leave a running batch between decode steps.

    engine = Engine(model, max_batch=8, tokenizer=tok)
    sid = engine.add(prompt_ids, SamplingParams(max_new_tokens=64, temperature=0.7, seed=1))
    for event in engine.run():          # or engine.step() from a serving loop
        print(event.seq_id, event.token, event.text, event.finish_reason)

Each step (1) takes up to `prefill_chunk` prompt tokens in all, from waiting sequences one after
another while rows are free (chunked prefill: a long prompt is spread over steps, so running
sequences keep decoding; short prompts arriving together join the batch several per step instead
of one per step), and (2) the next token of every running sequence, each row at its own position,
and runs them as one forward (herd.inference.batched.BatchDecoder.step: every weight is read once
per step, as vLLM and llama-server batch prompt tokens with decode tokens). One running row alone
takes the batch-1 step (herd.inference.single). Models the batched step does not run (mocks, other
devices) take one forward per prompt segment, then one for the decode rows. Live sequences occupy
cache rows 0 … n-1; when one finishes, the last row moves into its place, so the decode batch is
always a contiguous view of the cache (no gather per step). Images are encoded once, when the sequence's prefill starts.

Prefix reuse across requests (`prefix_cache_bytes` > 0): when a sequence finishes (stop or length;
never a cancelled one) its cache row is copied into a bounded LRU store
(herd.inference.cache.PrefixStore), keyed by the token ids it holds. A new prompt that starts with
a kept sequence's tokens — a chat's next turn resends the conversation so far — gets those rows
copied back and prefills only the rest, as far as iRoPE's chunked layers still hold what the rest
needs (the store's docstring has the chunk-boundary rule). `engine.prefix.hits` / `.reused_tokens`
count what it saved.

The engine runs the model it is given prepared for inference (herd.inference.fast.inference_view:
a trainable Llama4 is turned into a separate, prepared copy, cached until its weights change; the
model itself is left untouched) and holds its own decode steps: herd.inference.single for one token
of one sequence, herd.inference.batched for one token of each of several. An Engine serves the
weights it was built with: after an optimizer step, build a new one (herd.generate does so on every
call); `add` refuses requests once the source model's weights have changed.

`add` and `cancel` may be called from other threads; `step` runs in one thread.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from herd.inference.batched import BatchDecoder
from herd.inference.cache import KVCache, PrefixStore
from herd.inference.fast import inference_view, weights_version
from herd.inference.sampling import RowState, SamplingParams, sample
from herd.inference.single import SingleDecoder
from herd.inference.text import TextStream


@dataclass
class Event:
    """One generated token of one sequence (token None: the sequence ended without a new token)."""

    seq_id: Any
    token: int | None
    text: str = ""  # new text (needs a tokenizer); held back while it may start a stop string
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" on the sequence's last event
    cached_tokens: int = 0  # on a sequence's first event: prompt tokens taken from the prefix store


class Sequence:
    """A request's state inside the engine."""

    def __init__(self, seq_id, prompt: list[int], params: SamplingParams, vocab_size: int, eos: list[int],
                 tokenizer=None, pixel_values=None, image_features=None):
        self.id = seq_id
        self.prompt = prompt
        self.params = params
        self.stop_ids = set(eos if params.stop_token_ids is None else params.stop_token_ids)
        self.state = RowState(params, vocab_size, prompt=prompt, stop_ids=self.stop_ids)
        self.text = TextStream(tokenizer, params.stop) if tokenizer is not None else None
        self.pixel_values, self.features = pixel_values, image_features
        self.output: list[int] = []
        self.prefilled = 0  # prompt tokens already in the cache
        self.reused = 0  # of those, taken from the prefix store
        self.all_features = image_features  # kept for the prefix store (features is dropped after prefill)
        self.image_offset = 0  # image features already consumed by prefill
        self.last: int | None = None  # the token to feed next
        self.finish_reason: str | None = None

    def accept(self, token: int, logprob=None, top=None, max_seq_len: int | None = None) -> Event:
        """Record a sampled token → its Event (finish_reason set when the sequence is done)."""
        self.output.append(token)
        self.state.observe(token)
        self.last = token
        reason, text = None, ""
        if token in self.stop_ids:
            reason = "stop"
            text = self.text.finish() if self.text else ""
        else:
            if self.text is not None:
                text = self.text.push(token)
                if self.text.stopped:
                    reason = "stop"
            if reason is None and (len(self.output) >= self.params.max_new_tokens or (
                    max_seq_len is not None and len(self.prompt) + len(self.output) >= max_seq_len)):
                reason = "length"
            if reason == "length" and self.text is not None:
                text += self.text.finish()
        self.finish_reason = reason
        return Event(self.id, token, text, logprob, top, reason, self.reused if len(self.output) == 1 else 0)


def forward_step(model, ids: torch.Tensor, cache: KVCache, image_features: torch.Tensor | None = None,
                 decoder: SingleDecoder | None = None, batch_decoder: BatchDecoder | None = None) -> torch.Tensor:
    """ids [B, T] continuing the cache's selected rows → logits of each row's last position [B, vocab].

    Llama4.forward without its input checks (the engine validated the prompt; sampled ids are in
    range), and the LM head on the last position only. One token of one row runs `decoder` (the
    batch-1 step of herd.inference.single, built for this model) when one is given; one token of
    each of several rows runs `batch_decoder` (herd.inference.batched) when one is given.
    """
    if image_features is None and ids.shape[1] == 1 and ids.shape[0] == cache.selected_rows:
        if decoder is not None and ids.shape[0] == 1:
            return decoder(ids, cache)  # decode at batch 1: herd.inference.single
        if batch_decoder is not None and ids.shape[0] > 1:
            return batch_decoder(ids, cache)  # decode at batch B: herd.inference.batched
    T = ids.shape[1]
    start = cache.next_position
    if isinstance(start, torch.Tensor):
        positions = start.view(-1, 1) + torch.arange(T, device=ids.device)
    else:
        positions = torch.arange(start, start + T, device=ids.device)
    h = model.hidden_states(model.embed(ids, image_features=image_features), positions, cache)
    return model.language_model.lm_head(h[:, -1])


def prefill_tokens(model, cache: KVCache, row: int, ids: list[int], features: torch.Tensor | None,
                   image_token: int | None, decoder: SingleDecoder | None = None) -> tuple[torch.Tensor, int]:
    """Run `ids` through the model into cache row `row` → (last position's logits [vocab], image
    features used). `features` are the image features from this segment's first image token on."""
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    feats, used = None, 0
    if features is not None and image_token is not None:
        used = sum(1 for t in ids if t == image_token)
        feats = features[:used] if used else None
    return forward_step(model, x, cache.select(row, 1), feats, decoder)[0], used


class Engine:
    """Batched generation with sequences added and removed between steps (see module docstring).

    max_batch: rows of the KV cache (sequences decoding at once; more wait in a queue).
    max_seq_len: hard limit on prompt + output tokens per sequence (None: the cache grows).
    capacity: positions reserved per row up front (grows on demand when max_seq_len is None).
    prefill_chunk: prompt tokens per step (bounds prefill memory and the time running rows wait; long
    prompts take several steps, short ones share a step). None: one whole prompt per step.
    kv_dtype: None (the model's dtype) or "int8" for the global layers' keys/values.
    tokenizer: enables text deltas and stop strings.
    compile: torch.compile the batch-1 decode step (herd.inference.single).
    single_step: use the batch-1 decode step where it applies (False: always the general forward,
    for comparisons).
    batch_step: decode two or more rows with the batched step (herd.inference.batched) where it
    applies (False: the general forward, for comparisons).
    prefix_cache_bytes: memory for the KV rows of finished sequences, reused by later prompts that
    extend them (0: off; see the module docstring).
    """

    def __init__(self, model, *, max_batch: int = 8, max_seq_len: int | None = None, capacity: int | None = None,
                 prefill_chunk: int | None = 512, kv_dtype=None, tokenizer=None, compile: bool = False,
                 single_step: bool = True, batch_step: bool = True, prefix_cache_bytes: int = 0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1, got {max_batch}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be ≥ 1 or None, got {prefill_chunk}")
        self.model = inference_view(model)  # prepared for inference; `model` itself is not touched
        self.decoder = SingleDecoder.for_model(self.model, compile=compile) if single_step else None
        self.batch_decoder = BatchDecoder.for_model(self.model) if batch_step else None
        self._source = None  # (weakref to the trainable model, its weights_version) when prepared from one
        if self.model is not model:
            self._source = (weakref.ref(model), weights_version(model))
        cfg = model.config
        self.vocab_size = cfg.text.vocab_size
        self.eos = cfg.text.eos_token_ids
        self.image_token = cfg.image_token_index if cfg.vision is not None else None
        self.tokens_per_tile = cfg.vision.tokens_per_tile if cfg.vision is not None else None
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.prefill_chunk = prefill_chunk
        self.tokenizer = tokenizer
        cap = capacity or (max_seq_len if max_seq_len is not None else 2048)
        self.cache = KVCache.for_model(self.model, batch_size=max_batch, capacity=cap, kv_dtype=kv_dtype)
        self.prefix = PrefixStore(prefix_cache_bytes) if prefix_cache_bytes else None
        self.active: list[Sequence] = []  # row i holds active[i]
        self.prefilling: Sequence | None = None  # in row len(active)
        self.waiting: deque[Sequence] = deque()
        self._incoming: deque[Sequence] = deque()
        self._cancel: set = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.steps = 0

    # ----- requests -------------------------------------------------------------------------
    def add(self, prompt, params: SamplingParams | None = None, *, pixel_values: torch.Tensor | None = None,
            image_features: torch.Tensor | None = None, seq_id=None) -> Any:
        """Queue a prompt (token ids) → its id. pixel_values [tiles, 3, S, S] are encoded at prefill."""
        params = params or SamplingParams()
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() == 2 and prompt.shape[0] == 1:
                prompt = prompt[0]
            if prompt.dim() != 1:
                raise ValueError(f"a prompt is one sequence of token ids, got shape {tuple(prompt.shape)}")
            prompt = prompt.tolist()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty: generation needs at least one token (e.g. BOS)")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if self.max_seq_len is not None and len(prompt) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room under max_seq_len {self.max_seq_len}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (Engine(..., tokenizer=...))")
        self._check_weights()
        n_img = prompt.count(self.image_token) if self.image_token is not None else 0
        if pixel_values is not None or image_features is not None:
            if self.image_token is None:
                raise ValueError("this model is text-only (no vision_config) but images were given")
            have = (image_features.shape[0] if image_features is not None
                    else pixel_values.shape[0] * self.tokens_per_tile)
            if have != n_img:
                raise ValueError(f"the prompt has {n_img} image tokens (id {self.image_token}) but the images give "
                                 f"{have} features ({self.tokens_per_tile} per tile)")
        seq_id = next(self._ids) if seq_id is None else seq_id
        seq = Sequence(seq_id, prompt, params, self.vocab_size, self.eos, self.tokenizer, pixel_values, image_features)
        with self._lock:
            self._incoming.append(seq)
        return seq_id

    def _check_weights(self) -> None:
        if self._source is None:
            return
        ref, version = self._source
        model = ref()
        if model is not None and weights_version(model) != version:
            raise ValueError("the model's weights changed after this Engine was built (an optimizer step?): it "
                             "would run the old weights. Build a new Engine for the new weights (herd.generate "
                             "does so on every call)")

    def cancel(self, seq_id) -> None:
        """Stop a sequence (it ends with finish_reason "cancelled" at the next step)."""
        with self._lock:
            self._cancel.add(seq_id)

    def has_work(self) -> bool:
        with self._lock:
            incoming = bool(self._incoming) or bool(self._cancel)
        return incoming or bool(self.waiting) or self.prefilling is not None or bool(self.active)

    def run(self) -> Iterator[Event]:
        """Step until every queued sequence has finished, yielding events as they happen."""
        while self.has_work():
            yield from self.step()

    # ----- one step ---------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Prefill one segment of a waiting prompt, then decode one token for every running row."""
        events: list[Event] = []
        with self._lock:
            self.waiting.extend(self._incoming)
            self._incoming.clear()
            cancel, self._cancel = self._cancel, set()
        with torch.inference_mode():
            if cancel:
                self._cancel_now(cancel, events)
            if self.batch_decoder is not None:
                self._mixed_step(events)
                self.steps += 1
                return events
            budget = self.prefill_chunk
            while True:  # prefill segments until the step's token budget is spent
                if self.prefilling is None and self.waiting and len(self.active) < self.max_batch:
                    self._start_prefill(self.waiting.popleft())
                if self.prefilling is None:
                    break
                used = self._prefill_step(events, budget)
                if budget is None or self.prefilling is not None:
                    break
                budget -= used
                if budget <= 0:
                    break
            if self.active:
                self._decode_step(events)
        self.steps += 1
        return events

    def _cancel_now(self, ids: set, events: list[Event]) -> None:
        kept = deque()
        for s in self.waiting:
            (events.append(Event(s.id, None, finish_reason="cancelled")) if s.id in ids else kept.append(s))
        self.waiting = kept
        if self.prefilling is not None and self.prefilling.id in ids:
            events.append(Event(self.prefilling.id, None, finish_reason="cancelled"))
            self.prefilling = None
        for r in reversed(range(len(self.active))):
            if self.active[r].id in ids:
                events.append(Event(self.active[r].id, None, finish_reason="cancelled"))
                self._remove(r)

    def _start_prefill(self, seq: Sequence, row: int | None = None) -> None:
        row = len(self.active) if row is None else row
        self.cache.reset(row)
        if seq.features is None and seq.pixel_values is not None:
            seq.features = self.model.encode_images(seq.pixel_values)  # once per prompt
            seq.all_features, seq.pixel_values = seq.features, None
        if self.prefix is not None:
            m = self.prefix.restore(self.cache, row, seq.prompt, seq.features, self.image_token)
            seq.prefilled = seq.reused = m
            if m and self.image_token is not None:
                seq.image_offset = seq.prompt[:m].count(self.image_token)
        self.prefilling = seq

    def _prefill_step(self, events: list[Event], budget: int | None) -> int:
        """Prefill up to `budget` tokens of the prefilling sequence → tokens prefilled."""
        seq, row = self.prefilling, len(self.active)
        n = len(seq.prompt) - seq.prefilled
        if budget is not None:
            n = min(n, budget)
        ids = seq.prompt[seq.prefilled:seq.prefilled + n]
        feats = seq.features[seq.image_offset:] if seq.features is not None else None
        logits, used = prefill_tokens(self.model, self.cache, row, ids, feats, self.image_token, self.decoder)
        seq.prefilled += n
        seq.image_offset += used
        if seq.prefilled < len(seq.prompt):
            return n
        self.prefilling = None
        seq.features = None
        if seq.params.max_new_tokens == 0:
            events.append(Event(seq.id, None, finish_reason="length", cached_tokens=seq.reused))
            self._retain(seq, row)
            return n
        out = sample(logits[None], [seq.state])
        reason = self._accept(seq, out.tokens[0], out.logprobs[0], out.top_logprobs[0], events)
        if reason is None:
            self.active.append(seq)  # row `row` == len(active) before the append
        else:
            self._retain(seq, row)
        return n

    def _mixed_step(self, events: list[Event]) -> None:
        """One forward (herd.inference.batched.BatchDecoder.step) for the next token of every running
        row and for up to `prefill_chunk` prompt tokens of waiting sequences, in the rows after them:
        the weights are read once for both. A prompt that completes samples its first token and
        decodes from the next step on. One running row and no prompt: the batch-1 step."""
        n, row, budget = len(self.active), len(self.active), self.prefill_chunk
        segs = []  # (sequence, row, its prompt tokens run now, image features used)
        seq, started = self.prefilling, []
        while True:  # prompt segments, one row each, until the step's token budget is spent
            if seq is None:
                if not self.waiting or row >= self.max_batch:
                    break
                seq = self.waiting.popleft()
                started.append(seq)
                self._start_prefill(seq, row)
            m = len(seq.prompt) - seq.prefilled
            m = m if budget is None else min(m, budget)
            ids = seq.prompt[seq.prefilled:seq.prefilled + m]
            feats, used = None, 0
            if seq.features is not None and self.image_token is not None:
                used = ids.count(self.image_token)
                feats = seq.features[seq.image_offset:seq.image_offset + used] if used else None
            segs.append((seq, row, ids, feats, used))
            if budget is not None:
                budget -= m
            if seq.prefilled + m < len(seq.prompt) or budget is None or budget <= 0:
                break
            seq, row = None, row + 1
        if not n and not segs:
            return
        try:
            if n == 1 and not segs and self.decoder is not None:  # one row alone: the batch-1 step
                logits = self.decoder(torch.tensor([[self.active[0].last]]), self.cache.select(0, 1))
            else:
                logits = self.batch_decoder.step(self.cache, [s.last for s in self.active],
                                                 [(r, ids, f) for _, r, ids, f, _ in segs], self.image_token)
        except BaseException:  # nothing advanced: the prompts started here wait again, in their order
            self.prefilling = segs[0][0] if segs and segs[0][0] not in started else None
            self.waiting.extendleft(reversed(started))
            raise
        self.prefilling = None
        want = list(range(n))  # logits rows to sample: every decode row and each prompt now complete
        for j, (seq, _, ids, _, used) in enumerate(segs):
            seq.prefilled += len(ids)
            seq.image_offset += used
            if seq.prefilled == len(seq.prompt) and seq.params.max_new_tokens > 0:
                want.append(n + j)
        seqs = self.active + [segs[j - n][0] for j in want[n:]]
        out = sample(logits if len(want) == logits.shape[0] else logits[want], [s.state for s in seqs])
        k = n
        for seq, r, _, _, _ in segs:  # completed prompts join the running rows (kept contiguous)
            if seq.prefilled < len(seq.prompt):  # the step's last segment, still prefilling
                self.cache.copy_row(r, len(self.active))
                self.prefilling = seq
                continue
            seq.features = None
            if seq.params.max_new_tokens == 0:
                events.append(Event(seq.id, None, finish_reason="length", cached_tokens=seq.reused))
                self._retain(seq, r)
                continue
            reason = self._accept(seq, out.tokens[k], out.logprobs[k], out.top_logprobs[k], events)
            k += 1
            if reason is None:
                self.cache.copy_row(r, len(self.active))
                self.active.append(seq)
            else:
                self._retain(seq, r)
        done = [r for r, seq in enumerate(self.active[:n])
                if self._accept(seq, out.tokens[r], out.logprobs[r], out.top_logprobs[r], events) is not None]
        for r in done:
            self._retain(self.active[r], r)
        for r in reversed(done):
            self._remove(r)

    def _decode_step(self, events: list[Event]) -> None:
        n = len(self.active)
        ids = torch.tensor([[s.last] for s in self.active], dtype=torch.long, device=self.model.device)
        logits = forward_step(self.model, ids, self.cache.select(0, n), decoder=self.decoder,
                              batch_decoder=self.batch_decoder)  # [n, vocab]
        out = sample(logits, [s.state for s in self.active])
        done = []
        for r, seq in enumerate(self.active):
            if self._accept(seq, out.tokens[r], out.logprobs[r], out.top_logprobs[r], events) is not None:
                done.append(r)
        for r in done:
            self._retain(self.active[r], r)
        for r in reversed(done):
            self._remove(r)

    def _retain(self, seq: Sequence, row: int) -> None:
        """A finished sequence's row goes to the prefix store (its tokens: prompt + output fed back)."""
        if self.prefix is not None:
            self.prefix.save(self.cache, row, seq.prompt + seq.output, seq.all_features)

    def _accept(self, seq: Sequence, token: int, logprob, top, events: list[Event]) -> str | None:
        """Record a sampled token; returns the finish reason if the sequence is done."""
        events.append(seq.accept(token, logprob, top, self.max_seq_len))
        return seq.finish_reason

    def _remove(self, r: int) -> None:
        """Drop active row r, keeping live rows contiguous (the last row moves into r)."""
        last = len(self.active) - 1
        if r != last:
            self.cache.copy_row(last, r)
            self.active[r] = self.active[last]
        self.active.pop()
        if self.prefilling is not None:  # it sits right after the live rows
            self.cache.copy_row(last + 1, last)
