"""Loading models: `herd.load_model` (any directory, quantized ones included) and the model +
tokenizer pair that `herd generate` / `herd chat` (and the server) run.

    model = load_model("runs/tiny")                               # herd.load_model: trainable Llama4
    model = load_model("runs/tiny", for_inference=True)           # prepared for inference (fast.py)
    model = load_model("runs/tiny-int8")                          # a `herd quantize` directory
    model, tok = load_for_inference("tiny")                       # random weights, no tokenizer

This module sits above both layers it joins: herd.model.weights reads the Hugging Face layout,
herd.inference.quant the quantized one, and neither knows the other.
    model, tok = load_for_inference("out/run1", tokenizer=None)  # tokenizer.json from the directory
    model, tok = load_for_inference("out/run1", bits=8)           # quantized on the fly
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from herd.inference.fast import optimize_for_inference
from herd.inference.quant import is_quantized_dir, load_quantized, quantize_model
from herd.model import weights

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


class TokenizerMissing(ValueError):
    """Raised by require_tokenizer with a message that says what to pass."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose bfloat16 or float32 (never float16 on CPU)") from None


def find_tokenizer(model_name: str, model=None, tokenizer: str | None = None):
    """The tokenizer to use: the explicit one, else one shipped in the model directory, else the
    official Llama 4 tokenizer for models with its vocabulary (202,048). None when there is none."""
    from herd.tokenizer import load_tokenizer

    if tokenizer:
        return load_tokenizer(tokenizer)
    d = Path(model_name)
    if d.is_dir() and ((d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file()):
        return load_tokenizer(d)
    if model is not None and model.config.text.vocab_size == 202048:
        try:
            return load_tokenizer("llama4")
        except ValueError:
            return None
    return None


def require_tokenizer(tok, model_name: str):
    if tok is None:
        raise TokenizerMissing(
            f"no tokenizer for {model_name!r}: a preset with random weights or a directory without tokenizer.json. "
            "Pass --tokenizer PATH (a directory with tokenizer.json / tokenizer.model, e.g. from "
            "`herd tokenizer train --vocab-size N --out DIR`, N = the model's vocab size), "
            "or give token ids with --prompt-ids")
    return tok


def check_vocab(tok, model) -> None:
    if tok is not None and tok.vocab_size > model.config.text.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model only "
                         f"{model.config.text.vocab_size}; "
                         "they do not belong together")


def load_model(name_or_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu",
               allow_pickle: bool = False, seed: int = 0, *, for_inference: bool = False):
    """herd.load_model: a preset name (random weights), a Hugging Face / herd model directory, or a
    directory written by `herd quantize` → a Llama4 in eval mode.

    for_inference=True gives the model prepared for inference (herd.inference.fast: fused
    projections, decode kernels, no gradients; `train()` raises) without keeping the trainable
    form. Not needed for speed — herd.generate and herd.Engine prepare a trainable model
    themselves — but it saves the memory of holding both forms. A quantized directory always
    loads prepared (int8/int4 weights cannot be trained), in `dtype` for everything else.
    """
    if is_quantized_dir(name_or_dir):
        if device != "cpu":
            raise ValueError(f"{name_or_dir} is quantized for CPU inference; device={device!r} is not supported")
        return load_quantized(name_or_dir, dtype)
    model = weights.load_model(name_or_dir, dtype=dtype, device=device, allow_pickle=allow_pickle, seed=seed)
    return optimize_for_inference(model) if for_inference else model


def load_for_inference(name: str, *, dtype: str | torch.dtype = "bfloat16", bits: int | None = None,
                       group_size: int = 64, tokenizer: str | None = None, optimize: bool = True, seed: int = 0):
    """→ (model ready for inference, tokenizer or None). bits: quantize on the fly (8 or 4)."""
    dtype = parse_dtype(dtype)
    if is_quantized_dir(name):
        if bits is not None:
            raise ValueError(f"{name} is already quantized; drop --bits")
        model = load_quantized(name, dtype)
    elif bits is not None:
        model = quantize_model(weights.load_model(name, dtype=dtype, seed=seed), bits=bits, group_size=group_size)
    else:
        model = load_model(name, dtype=dtype, seed=seed, for_inference=optimize)
    tok = find_tokenizer(name, model, tokenizer)
    check_vocab(tok, model)
    return model, tok
