"""Weights in and out, in the Hugging Face directory layout.

    load_model("tiny")                  # a preset with fresh random weights
    load_model("path/to/hf_dir")        # config.json + model.safetensors | model-0000x-of-0000y.safetensors
    load_model("path/to/quantized")     # refused: a `herd quantize` directory is read by herd.load_model
                                        # (herd.inference.loading), which knows the quantized layout
    save_model(model, "out_dir")        # the same layout; transformers loads it unchanged

Reading is memory-mapped: tensors are views of the (privately mapped) files, so loading a model
in its stored dtype costs no second copy (peak RSS ≈ the weights' size). Multimodal models use the
`Llama4ForConditionalGeneration` key layout (`language_model.model.*`, `vision_model.*`,
`multi_modal_projector.*`), text-only ones the `Llama4ForCausalLM` layout (`model.*`, `lm_head.*`).
One herd-only tensor may join them: a non-zero MoE load-balancing bias, `…feed_forward.expert_bias`
(read when present, zeros when absent; herd/model/moe.py explains why).
Pickle checkpoints (.bin/.pt) are refused unless the caller passes allow_pickle=True.
Every file is written atomically (temporary name, fsync, rename).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import torch

from herd.config import ModelConfig
from herd.model.llama4 import Llama4, build_model
from herd.model.moe import expert_biases

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


# ----- safetensors, memory-mapped ----------------------------------------------------------------
def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file as views of a private (copy-on-write) memory map."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8 or n > 100 * 2**20:
            raise ValueError(f"{path}: not a safetensors file (bad header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header: {e}") from None
        header.pop("__metadata__", None)
        data_start = 8 + n
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > data_start else None
    out = {}
    for name, info in header.items():
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        shape = info["shape"]
        count = 1
        for s in shape:
            count *= s
        if data_start + end > size or end - begin != count * torch.empty(0, dtype=dtype).element_size():
            raise ValueError(f"{path}: tensor {name!r} lies outside the file or has the wrong byte length "
                             "(truncated or corrupt file)")
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(mm, dtype=dtype, count=count, offset=data_start + begin).view(shape)
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, write) -> None:
    """Call write(fileobj) on a temporary file beside `path`, fsync it, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write tensors to a .safetensors file atomically (streaming, one tensor in memory at a time)."""
    header, offset = {}, 0
    items = []
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"cannot save tensor {name!r} of dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        items.append((t, nbytes))
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align data to 8 bytes

    def write(f):
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t, nbytes in items:
            if nbytes:
                t = t.detach().to("cpu").contiguous().reshape(-1)
                f.write(t.view(torch.uint8).numpy().data)

    atomic_write_bytes(path, write)


# ----- key layouts -------------------------------------------------------------------------------
def _checkpoint_files(d: Path) -> list[Path]:
    if (d / INDEX_NAME).exists():
        try:
            index = json.loads((d / INDEX_NAME).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{d / INDEX_NAME} is not a valid safetensors index: {e}") from None
        missing = [n for n in names if not (d / n).exists()]
        if missing:
            raise FileNotFoundError(f"{d}: shards named in {INDEX_NAME} are missing: {missing}")
        return [d / n for n in names]
    if (d / "model.safetensors").exists():
        return [d / "model.safetensors"]
    shards = sorted(d.glob("*.safetensors"))
    if shards:
        return shards
    return []


def read_model_tensors(d: str | os.PathLike, multimodal: bool) -> dict[str, torch.Tensor]:
    """Every weight of a model directory (one file or an indexed set of shards), memory-mapped,
    keyed by herd parameter names."""
    d = Path(d)
    files = _checkpoint_files(d)
    if not files:
        raise FileNotFoundError(f"{d}: no *.safetensors weights found")
    tensors = {}
    for f in files:
        tensors.update(read_safetensors(f))
    return {_to_herd_key(k, multimodal): v for k, v in tensors.items()}


def _pickle_files(d: Path) -> list[Path]:
    return sorted([*d.glob("*.bin"), *d.glob("*.pt"), *d.glob("*.pth")])


def _to_herd_key(key: str, multimodal: bool) -> str:
    """Checkpoint key → herd parameter name (herd names are the ConditionalGeneration ones)."""
    if multimodal:
        return key
    return key if key.startswith("language_model.") else "language_model." + key


def _to_ckpt_key(name: str, multimodal: bool) -> str:
    return name if multimodal else name.removeprefix("language_model.")


def load_state(model: Llama4, tensors: dict[str, torch.Tensor], dtype: torch.dtype, source: str) -> None:
    """Assign checkpoint tensors to the model's parameters; one error lists every problem."""
    multimodal = model.config.is_multimodal
    expected = dict(model.state_dict(keep_vars=True))
    tied = model.config.text.tie_word_embeddings
    if tied:
        expected.pop("language_model.lm_head.weight", None)
    got = {_to_herd_key(k, multimodal): v for k, v in tensors.items()}
    if tied and "language_model.lm_head.weight" in got:
        got.pop("language_model.lm_head.weight")  # some writers store the tied copy as well
    # herd-only MoE load-balancing biases: optional, zeros when absent (herd/model/moe.py)
    optional = {k: b for k, b in model.named_buffers() if k.endswith(".expert_bias")}
    biases = {k: got.pop(k) for k in list(got) if k in optional}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = {**expected, **optional}
    bad_shape = sorted(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(shapes[k].shape)}"
                       for k, v in {**got, **biases}.items() if k in shapes and tuple(v.shape) != tuple(shapes[k].shape))
    if missing or unexpected or bad_shape:
        lines = [f"checkpoint {source} does not match the model described by its config.json:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise ValueError("\n".join(lines))
    state = {k: (v if v.dtype == dtype else v.to(dtype)) for k, v in got.items()}
    model.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    for module in model.modules():  # non-persistent buffers (not in checkpoints) still on meta
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                module.register_buffer(name, torch.zeros(buf.shape, dtype=buf.dtype), persistent=False)
    for k, v in biases.items():
        model.get_submodule(k.removesuffix(".expert_bias")).expert_bias.copy_(v)


def quantization_config(d: str | os.PathLike) -> dict | None:
    """config.json's "quantization_config" of a model directory (None when absent or unreadable)."""
    p = Path(d) / "config.json"
    try:
        qc = json.loads(p.read_text()).get("quantization_config") if p.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return qc if isinstance(qc, dict) else None


def load_model(name_or_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu",
               allow_pickle: bool = False, seed: int = 0) -> Llama4:
    """A preset name (random weights) or a Hugging Face / herd model directory → Llama4 in eval mode,
    trainable. (herd.load_model is herd.inference.loading.load_model: it also reads quantized
    directories and can load straight into the inference form.)"""
    from herd.presets import PRESETS

    if isinstance(name_or_dir, str) and name_or_dir in PRESETS and not Path(name_or_dir).exists():
        return build_model(name_or_dir, dtype=dtype, device=device, seed=seed).eval()
    d = Path(name_or_dir)
    if not d.exists():
        raise FileNotFoundError(f"{d}: no such directory, and not a preset (presets: {', '.join(PRESETS)})")
    if d.is_file():
        raise ValueError(f"{d} is a file; pass the model directory that holds config.json and the weights")
    qc = quantization_config(d)
    if qc is not None:
        raise ValueError(f"{d} holds quantized weights ({qc.get('quant_method')}, {qc.get('bits')} bits), which cannot "
                         "be trained; load it for inference with herd.load_model(path)")
    config = ModelConfig.from_json(d)
    files = _checkpoint_files(d)
    if not files:
        pickles = _pickle_files(d)
        if not pickles:
            raise FileNotFoundError(f"{d}: no *.safetensors weights found")
        if not allow_pickle:
            raise ValueError(f"{d} holds only pickle weights ({', '.join(p.name for p in pickles)}); pickle can run "
                             "arbitrary code when loaded. Convert them to safetensors, or pass allow_pickle=True "
                             "if you trust the source.")
        tensors = {}
        for p in pickles:
            tensors.update(torch.load(p, map_location="cpu", weights_only=True, mmap=True))
    else:
        tensors = read_model_tensors(d, config.is_multimodal)
    with torch.device("meta"):
        model = Llama4(config)
    load_state(model, tensors, dtype, str(d))
    del tensors
    return model.to(device).eval()


def save_model(model: Llama4, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 2**30,
               dtype: torch.dtype | None = None, state_dict: dict | None = None) -> Path:
    """Write config.json and safetensors weights (sharded with an index past max_shard_bytes).

    state_dict: full tensors to write instead of model.state_dict() (e.g. gathered from FSDP shards).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    multimodal = cfg.is_multimodal
    state = dict(model.state_dict() if state_dict is None else state_dict)
    if state_dict is None:
        with torch.device("meta"):
            layout = set(Llama4(cfg).state_dict())
        if set(state) != layout:
            odd = sorted(set(state) ^ layout)
            raise ValueError(f"this model's weights are not in the checkpoint layout ({', '.join(odd[:4])} …): a model "
                             "prepared for inference fuses and re-lays-out its projections. Save the trainable model it "
                             "was prepared from (quantized models: herd.inference.save_quantized)")
    if cfg.text.tie_word_embeddings:
        state.pop("language_model.lm_head.weight", None)
    tensors = {_to_ckpt_key(k, multimodal): (v if dtype is None else v.to(dtype)) for k, v in state.items()}
    tensors.update({_to_ckpt_key(k, multimodal): v for k, v in expert_biases(model).items()})  # herd-only
    # shards: greedy in key order
    shards, current, size = [], {}, 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = tensors[k]
        size += nbytes
    shards.append(current)
    stale = {p.name for p in out.glob("model*.safetensors")} | ({INDEX_NAME} if (out / INDEX_NAME).exists() else set())
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0], meta)
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out / name, shard, meta)
            for k, v in shard.items():
                weight_map[k] = name
                total += v.numel() * v.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_bytes(out / INDEX_NAME, lambda f: f.write(json.dumps(index, indent=2).encode()))
    written = {INDEX_NAME} | set(weight_map.values()) if len(shards) > 1 else {"model.safetensors"}
    for name in stale - written:  # an earlier save's files, removed only once the new ones are in place
        (out / name).unlink()
    hf = cfg.to_hf_dict()
    saved_dtype = dtype or next(iter(tensors.values())).dtype
    hf["torch_dtype"] = str(saved_dtype).removeprefix("torch.")
    if multimodal:
        hf["text_config"]["torch_dtype"] = hf["torch_dtype"]
    atomic_write_bytes(out / "config.json", lambda f: f.write((json.dumps(hf, indent=2) + "\n").encode()))
    return out
