"""Inference: KV cache, chunked prefill, sampling, continuous batching, quantized weights, CLI.

    import herd
    new_ids = herd.generate(model, [prompt_ids], max_new_tokens=64)         # herd.inference.generate
    for ev in herd.generate_stream(model, prompt_ids, tokenizer=tok): ...   # herd.inference.generate_stream
    engine = herd.Engine(model, max_batch=8)                                # herd.inference.Engine

Modules: cache (KVCache), sampling (SamplingParams, sample), text (streaming detokenization),
engine (Engine: continuous batching), generate (generate, generate_stream), session (multi-turn
cache reuse), fast (the model prepared for inference: fused products, decode kernels; what
generate / Engine / Session run, built by themselves), single (the batch-1 decode step), quant
(int8/int4 weight-only quantization, save/load), loading (herd.load_model: plain and quantized
directories; model + tokenizer for the CLI), cli (`herd generate|chat|quantize`).
"""

from herd._lazy import lazy_getattr

_LAZY = {
    "KVCache": ("herd.inference.cache", "KVCache"),
    "SamplingParams": ("herd.inference.sampling", "SamplingParams"),
    "Engine": ("herd.inference.engine", "Engine"),
    "Event": ("herd.inference.engine", "Event"),
    "generate": ("herd.inference.generate", "generate"),
    "generate_stream": ("herd.inference.generate", "generate_stream"),
    "Generation": ("herd.inference.generate", "Generation"),
    "Session": ("herd.inference.session", "Session"),
    "quantize_model": ("herd.inference.quant", "quantize_model"),
    "save_quantized": ("herd.inference.quant", "save_quantized"),
    "load_quantized": ("herd.inference.quant", "load_quantized"),
    "optimize_for_inference": ("herd.inference.fast", "optimize_for_inference"),
    "load_for_inference": ("herd.inference.loading", "load_for_inference"),
    "load_model": ("herd.inference.loading", "load_model"),
    "inference_view": ("herd.inference.fast", "inference_view"),
    "InferenceLlama4": ("herd.inference.fast", "InferenceLlama4"),
}


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


__all__ = list(_LAZY)
