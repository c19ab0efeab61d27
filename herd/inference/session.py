"""A conversation with a persistent KV cache: each turn prefills only what is new.

    session = Session(model, tokenizer)
    for ev in session.generate(prompt_ids, SamplingParams(max_new_tokens=200), images=tiles):
        print(ev.text, end="")

`generate` takes the *whole* prompt each time (e.g. the chat history re-encoded); the longest
prefix already in the cache is reused and only the rest is prefilled. When the prompt diverges
from what is cached, the cache is cut back to the common prefix — or rebuilt, if a chunked layer
has already overwritten the chunk that prefix ends in. Image features are cached per image.
An exception (Ctrl-C) during decode keeps everything cached so far; during prefill the cache is
dropped and rebuilt next time. Like herd.Engine, a Session runs the model prepared for inference
(herd.inference.fast.inference_view) with its own batch-1 decode step.
"""

from __future__ import annotations

from typing import Iterator

import torch

from herd.inference.cache import KVCache
from herd.inference.engine import Event, Sequence, forward_step, prefill_tokens
from herd.inference.fast import inference_view
from herd.inference.sampling import SamplingParams, sample
from herd.inference.single import SingleDecoder


class Session:
    """One sequence (batch 1) whose cache survives between calls; see the module docstring."""

    def __init__(self, model, tokenizer=None, *, prefill_chunk: int | None = 512, kv_dtype=None,
                 capacity: int = 4096, compile: bool = False):
        self.model = inference_view(model)  # prepared for inference; `model` itself is not touched
        self.decoder = SingleDecoder.for_model(self.model, compile=compile)
        cfg = model.config
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.image_token = cfg.image_token_index if cfg.vision is not None else None
        self.cache = KVCache.for_model(self.model, 1, capacity, kv_dtype=kv_dtype)
        self.tokens: list[int] = []  # tokens whose keys/values are in the cache
        self._images: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tiles, features) per image
        self.reused = 0  # prompt tokens reused from the cache by the last generate()

    def reset(self) -> None:
        self.cache.reset()
        self.tokens = []

    def _features(self, images) -> torch.Tensor | None:
        if not images:
            return None
        feats = []
        for i, tiles in enumerate(images):
            seen = self._images[i][0] if i < len(self._images) else None
            if seen is not None and seen.shape == tiles.shape and torch.equal(seen, tiles):
                feats.append(self._images[i][1])
                continue
            with torch.inference_mode():
                f = self.model.encode_images(tiles)
            self._images[i:] = [(tiles, f)]
            feats.append(f)
        return torch.cat(feats)

    def generate(self, prompt: list[int], params: SamplingParams | None = None,
                 images: list[torch.Tensor] | None = None) -> Iterator[Event]:
        """Stream the continuation of `prompt` (the full token list); images: tiles per image, in order."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty")
        seq = Sequence(0, prompt, params, self.model.config.text.vocab_size, self.model.config.text.eos_token_ids,
                       self.tokenizer)
        n = 0
        limit = min(len(self.tokens), len(prompt) - 1)  # the last prompt token is always run (its logits)
        while n < limit and self.tokens[n] == prompt[n]:
            n += 1
        if n < len(self.tokens) and not self.cache.truncate(0, n):
            self.cache.reset()
            n = 0
        self.tokens = self.tokens[:n]
        self.reused = n
        feats = self._features(images)
        offset = sum(1 for t in prompt[:n] if t == self.image_token) if feats is not None else 0
        step = self.prefill_chunk or len(prompt)
        try:
            for a in range(n, len(prompt), step):
                ids = prompt[a:a + step]
                with torch.inference_mode():
                    logits, used = prefill_tokens(self.model, self.cache, 0, ids,
                                                  feats[offset:] if feats is not None else None, self.image_token,
                                                  self.decoder)
                offset += used
                self.tokens += ids
        except BaseException:
            self.reset()
            raise
        if params.max_new_tokens == 0:
            yield Event(0, None, finish_reason="length")
            return
        while True:
            out = sample(logits[None], [seq.state])
            ev = seq.accept(out.tokens[0], out.logprobs[0], out.top_logprobs[0])
            yield ev
            if ev.finish_reason is not None:
                return
            x = torch.tensor([[ev.token]], dtype=torch.long, device=self.model.device)
            with torch.inference_mode():
                logits = forward_step(self.model, x, self.cache.select(0, 1), decoder=self.decoder)[0]
            self.tokens.append(ev.token)
