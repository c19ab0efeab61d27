"""Deterministic train/validation split by document: a stable hash of each document's key.

    is_val = validation_mask(["hamlet/000", "hamlet/001", ...], val_fraction=0.05)

A document is in validation when blake2b(salt + key) read as a number in [0, 1) is below
`val_fraction`. The decision depends only on the key, the fraction and the salt (never on
the order, the other documents or the training seed), so it is the same on every machine and
run, and growing the fraction only moves documents from train to validation.

So that neither half is empty, a source of at least two documents whose hash split leaves one
side empty moves the document with the smallest (or largest) hash across.
"""

from __future__ import annotations

import hashlib

import numpy as np

DEFAULT_SALT = "herd-split-v1"


def split_hash(key: str, salt: str = DEFAULT_SALT) -> float:
    """The key's position in [0, 1): the first 8 bytes of blake2b(salt \\0 key)."""
    digest = hashlib.blake2b(f"{salt}\0{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def validation_mask(keys, val_fraction: float, salt: str = DEFAULT_SALT) -> np.ndarray:
    """Boolean array: True where the document with that key belongs to validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    h = np.array([split_hash(k, salt) for k in keys], dtype=np.float64)
    mask = h < val_fraction
    if val_fraction > 0 and len(h) >= 2:
        if not mask.any():
            mask[np.argmin(h)] = True
        elif mask.all():
            mask[np.argmax(h)] = False
    return mask
