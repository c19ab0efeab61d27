"""Crash-safe training checkpoints.

    OUT/checkpoints/step_000200/
        config.json, model.safetensors     the model in the Hugging Face layout (herd.load_model and
                                           transformers load this folder directly)
        trainer_state.pt                   optimizer, step, data position, RNG states, MoE biases
    OUT/checkpoints/latest                 name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder, every file fsynced, then the folder is
renamed into place and `latest` is replaced atomically, so a crash (even SIGKILL) at any moment
leaves the previous checkpoint intact and loadable. Only the newest `keep` are kept.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from herd.model.weights import _fsync_dir, atomic_write_bytes, save_model

STATE_FILE = "trainer_state.pt"
MAX_SHARD_BYTES = 5 * 2**30  # model weights past this size are split into indexed shards (HF layout)


def rng_state() -> dict:
    """Every RNG the trainer touches, as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, g = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, g))


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def save_checkpoint(root: str | Path, step: int, model, trainer_state: dict, keep: int = 3,
                    extra_files: dict[str, Path] | None = None, model_state: dict | None = None) -> Path:
    """Write checkpoint `step` under root/checkpoints atomically; prune to the newest `keep`.

    model_state: full weights to write (from herd.train.distributed.full_model_state under FSDP)."""
    ckpts = Path(root) / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = ckpts / name
    tmp = ckpts / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, tmp, state_dict=model_state, max_shard_bytes=MAX_SHARD_BYTES)
    delay = float(os.environ.get("HERD_TEST_SLOW_SAVE", "0"))  # tests widen the window for a SIGKILL
    if delay:
        time.sleep(delay)
    atomic_write_bytes(tmp / STATE_FILE, lambda f: torch.save(trainer_state, f))
    for fname, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / fname)
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): swap the old one out
        old = ckpts / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(ckpts)
    atomic_write_bytes(ckpts / "latest", lambda f: f.write(name.encode()))
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpts.glob(".tmp-*"):  # leftovers of a crashed save (another pid)
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    ckpts = Path(root) / "checkpoints"
    if not ckpts.is_dir():
        return []
    done = [p for p in ckpts.glob("step_*") if (p / STATE_FILE).exists() and (p / "config.json").exists()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint (by the `latest` pointer, or by scanning if it is missing)."""
    ckpts = Path(root) / "checkpoints"
    pointer = ckpts / "latest"
    if pointer.exists():
        p = ckpts / pointer.read_text().strip()
        if (p / STATE_FILE).exists():
            return p
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_trainer_state(ckpt: Path) -> dict:
    """The non-weight state. Loaded with weights_only=True: tensors and plain containers only."""
    try:
        return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — a corrupt file must name itself
        raise ValueError(f"{ckpt / STATE_FILE} could not be read ({e}); the checkpoint is damaged") from None
