"""herd: the whole Llama 4 system in plain PyTorch.

Public API (kept small and stable; other modules, tests and benchmarks use it):

    import herd
    model = herd.load_model("tiny" | "path/to/hf_dir", dtype=torch.float32)   # trainable
    model = herd.load_model(path, for_inference=True)                          # inference only
    logits = model(input_ids)                       # [B, T, vocab]
    logits = model(input_ids, pixel_values=pv)      # pv [n_tiles, 3, H, W]
    herd.save_model(model, out_dir)
    tok = herd.load_tokenizer("llama4" | "path/to/dir")
    new_ids = herd.generate(model, [prompt_ids], max_new_tokens=64)   # runs the fast path by itself
    engine = herd.Engine(model, max_batch=8)                          # likewise
"""

__version__ = "0.1.0"

from herd._lazy import lazy_getattr

_LAZY = {
    "ModelConfig": ("herd.config", "ModelConfig"),
    "TextConfig": ("herd.config", "TextConfig"),
    "VisionConfig": ("herd.config", "VisionConfig"),
    "get_config": ("herd.presets", "get_config"),
    "Llama4": ("herd.model.llama4", "Llama4"),
    "build_model": ("herd.model.llama4", "build_model"),
    "load_model": ("herd.inference.loading", "load_model"),
    "save_model": ("herd.model.weights", "save_model"),
    "count_params": ("herd.params", "count_params"),
    "load_tokenizer": ("herd.tokenizer", "load_tokenizer"),
    "generate": ("herd.inference.generate", "generate"),
    "generate_stream": ("herd.inference.generate", "generate_stream"),
    "Engine": ("herd.inference.engine", "Engine"),
}


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


__all__ = list(_LAZY)
