"""Llama 4 image preprocessing: load, dynamic tiling, normalisation (Pillow, NumPy, torch only).

    img = load_image(source)                         # PIL | path | bytes | data URL -> RGB PIL
    out = preprocess_image(img, vision_config)       # TiledImage
    out.tiles                                        # [n_tiles, 3, T, T] float32 in [-1, 1]
    out.grid                                         # (rows, cols) of the local tiles

Dynamic tiling (what Llama 4 was trained with):
  1. canvases: every grid (rows x cols) with rows * cols <= max_num_tiles, in tile units;
  2. pick the canvas that needs the least upscaling (or, if every canvas needs downscaling,
     the least downscaling), breaking ties by smallest area;
  3. resize without distortion, upscaling no further than one tile side (bilinear);
  4. pad with black to the canvas (image in the top-left corner);
  5. normalise: (x / 255 - 0.5) / 0.5;
  6. split into tiles, row by row; when there is more than one tile, append a global tile:
     the whole image squashed to T x T.

Tile size, patch size, pixel shuffle and tile count come from the model's vision config
(`VisionSettings.from_config`), so tiny test models use exactly the same code.
Pixel values match llama-models' VariableSizeImageTransform / ResizeNormalizeImageTransform.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Published Llama 4 settings (Scout / Maverick).
DEFAULT_TILE_SIZE = 336
DEFAULT_PATCH_SIZE = 14
DEFAULT_PIXEL_SHUFFLE_RATIO = 0.5
DEFAULT_MAX_NUM_TILES = 16
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own decompression-bomb warning threshold
MEAN = 0.5
STD = 0.5


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class VisionSettings:
    """What preprocessing and the chat format need to know about the vision encoder."""

    tile_size: int = DEFAULT_TILE_SIZE
    patch_size: int = DEFAULT_PATCH_SIZE
    pixel_shuffle_ratio: float = DEFAULT_PIXEL_SHUFFLE_RATIO
    max_num_tiles: int = DEFAULT_MAX_NUM_TILES

    def __post_init__(self):
        if self.tile_size <= 0 or self.patch_size <= 0 or self.tile_size % self.patch_size:
            raise ValueError(f"tile size {self.tile_size} must be a positive multiple of patch size {self.patch_size}")
        if not 0 < self.pixel_shuffle_ratio <= 1:
            raise ValueError(f"pixel_shuffle_ratio must be in (0, 1], got {self.pixel_shuffle_ratio}")
        if self.max_num_tiles < 1:
            raise ValueError(f"max_num_tiles must be >= 1, got {self.max_num_tiles}")
        patches = (self.tile_size // self.patch_size) ** 2
        if patches % self.shuffle_factor:
            raise ValueError(f"{patches} patches per tile do not divide by the pixel-shuffle factor {self.shuffle_factor}")

    @property
    def shuffle_factor(self) -> int:
        """How many patches pixel shuffle merges into one token (4 for ratio 0.5)."""
        return int(round(1.0 / self.pixel_shuffle_ratio**2))

    @property
    def tokens_per_tile(self) -> int:
        """<|patch|> tokens per tile: (T / P)^2 / shuffle_factor (144 for Llama 4)."""
        return (self.tile_size // self.patch_size) ** 2 // self.shuffle_factor

    @classmethod
    def from_config(cls, config=None, max_num_tiles: int | None = None) -> "VisionSettings":
        """Duck-typed: an object or mapping with image_size, patch_size, pixel_shuffle_ratio
        and optionally max_num_tiles; None gives the published Llama 4 settings."""
        if config is None:
            return cls(max_num_tiles=max_num_tiles or DEFAULT_MAX_NUM_TILES)
        if isinstance(config, cls):
            return config if max_num_tiles is None else cls(config.tile_size, config.patch_size,
                                                            config.pixel_shuffle_ratio, max_num_tiles)

        def get(name, default=None):
            value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
            if value is None:
                value = default
            if value is None:
                raise ValueError(f"vision config {type(config).__name__} has no {name!r}")
            return value

        tiles = max_num_tiles or get("max_num_tiles", DEFAULT_MAX_NUM_TILES)
        return cls(int(get("image_size")), int(get("patch_size")), float(get("pixel_shuffle_ratio")), int(tiles))


# ----------------------------------------------------------------------------- loading


def _open_source(source) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(source)))
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        if source.startswith("data:"):
            return Image.open(io.BytesIO(decode_data_url(source)))
        if source.startswith("file://"):
            source = source[len("file://"):]
        elif "://" in source:
            raise ValueError(f"only local paths and data: URLs are supported, not {source[:40]!r}")
        if not Path(source).is_file():
            raise ValueError(f"image file not found: {source[:200]}")
        return Image.open(source)
    if hasattr(source, "read"):  # a binary file object
        return Image.open(source)
    raise ValueError(f"expected a PIL image, path, bytes or data URL, got {type(source).__name__}")


def decode_data_url(url: str) -> bytes:
    """Bytes of a base64 `data:image/...;base64,...` URL."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise ValueError(f"expected a 'data:<mime>;base64,<data>' URL, got {url[:40]!r}...")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"data URL holds invalid base64: {e}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`; transparent pixels are composited on white."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if not has_alpha:
        return image.convert("RGB")
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def load_image(source, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode `source` (PIL image, path, bytes, file object or data URL) into an RGB image.

    Honours EXIF orientation and composites transparency on white. Raises ValueError for
    data that is not an image, is truncated, or has more than `max_pixels` pixels.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below
            image = _open_source(source)
            width, height = image.size
            if width * height > max_pixels:
                raise ValueError(f"image of {width}x{height} pixels is larger than the limit of {max_pixels} pixels")
            if width < 1 or height < 1:
                raise ValueError(f"image has an empty size {width}x{height}")
            image.load()  # decode now, so truncated files fail here
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except ValueError:
        raise
    except Image.DecompressionBombError as e:
        raise ValueError(f"image is too large (decompression bomb?): {e}") from None
    except UnidentifiedImageError:
        raise ValueError("data is not an image Pillow can read (PNG, JPEG, GIF, WebP, ...)") from None
    except (OSError, SyntaxError, EOFError) as e:
        hint = " (LOAD_TRUNCATED_IMAGES is off)" if not ImageFile.LOAD_TRUNCATED_IMAGES else ""
        raise ValueError(f"image data is truncated or corrupt{hint}: {e}") from None


# ----------------------------------------------------------------------------- tiling


def candidate_canvases(max_num_tiles: int, tile_size: int) -> list[tuple[int, int]]:
    """All (width, height) canvases made of at most max_num_tiles tiles.

    Ordered as the reference orders them (it matters only for exact ties): tile counts from
    max_num_tiles down to 1, grouped by first appearance of each aspect ratio."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n_tiles in range(max_num_tiles, 0, -1):
        for a in sorted(d for d in range(1, n_tiles + 1) if n_tiles % d == 0):
            b = n_tiles // a
            by_ratio.setdefault(a / b, []).append((a * tile_size, b * tile_size))
    return [canvas for group in by_ratio.values() for canvas in group]


def best_canvas(image_size: tuple[int, int], canvases: list[tuple[int, int]], to_max_canvas: bool = False) -> tuple[int, int]:
    """The (width, height) canvas to resize an image of `image_size` (w, h) into.

    Each canvas allows scaling by min(W/w, H/h) without distortion. Prefer the smallest
    scale >= 1 (least upscaling; the largest with to_max_canvas); if none is >= 1, the
    largest scale (least downscaling). Among equal scales take the smallest area.
    Scales are float32, as in the reference."""
    w, h = image_size
    dims = np.array(canvases, dtype=np.int64)  # [n, 2] (W, H)
    scale_w = dims[:, 0].astype(np.float32) / np.float32(w)
    scale_h = dims[:, 1].astype(np.float32) / np.float32(h)
    scales = np.minimum(scale_w, scale_h)  # [n]
    up = scales[scales >= 1]
    if up.size:
        chosen_scale = up.max() if to_max_canvas else up.min()
    else:
        chosen_scale = scales.max()
    candidates = dims[scales == chosen_scale]
    best = candidates[np.argmin(candidates[:, 0] * candidates[:, 1])]  # first of the smallest
    return int(best[0]), int(best[1])


def fit_within(image_size: tuple[int, int], canvas: tuple[int, int], max_upscale: int | None) -> tuple[int, int]:
    """(width, height) to resize an image to so it fits `canvas` without distortion.

    With max_upscale set, a side is not upscaled beyond max(its size, max_upscale)."""
    w, h = image_size
    target_w, target_h = canvas
    if max_upscale is not None:
        target_w = min(max(w, max_upscale), target_w)
        target_h = min(max(h, max_upscale), target_h)
    scale_w, scale_h = target_w / w, target_h / h
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.floor(h * scale_w), target_h)
    else:
        new_w, new_h = min(math.floor(w * scale_h), target_w), target_h
    return max(new_w, 1), max(new_h, 1)


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor [3, H, W], (x / 255 - mean) / std."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # [H, W, 3]
    x = pixels.permute(2, 0, 1).to(torch.float32).div(255)  # [3, H, W] in [0, 1]
    return x.sub_(MEAN).div_(STD)


def split_tiles(image: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[C, rows*T, cols*T] -> [rows*cols, C, T, T], tiles in row-major order."""
    c, height, width = image.shape
    t_h, t_w = height // rows, width // cols
    tiles = image.view(c, rows, t_h, cols, t_w).permute(1, 3, 0, 2, 4)  # [rows, cols, C, T, T]
    return tiles.reshape(rows * cols, c, t_h, t_w)


def tile_image(image: Image.Image, tile_size: int, max_num_tiles: int,
               to_max_canvas: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
    """Dynamic tiling of an RGB image: (tiles [rows*cols, 3, T, T], (rows, cols))."""
    canvas = best_canvas(image.size, candidate_canvases(max_num_tiles, tile_size), to_max_canvas)
    new_size = fit_within(image.size, canvas, None if to_max_canvas else tile_size)
    resized = image.resize(new_size, Image.Resampling.BILINEAR)
    padded = Image.new("RGB", canvas, (0, 0, 0))
    padded.paste(resized, (0, 0))
    rows, cols = canvas[1] // tile_size, canvas[0] // tile_size
    return split_tiles(to_normalized_tensor(padded), rows, cols), (rows, cols)


def global_tile(image: Image.Image, tile_size: int) -> torch.Tensor:
    """The whole image squashed to one tile: [3, T, T]."""
    return to_normalized_tensor(image.resize((tile_size, tile_size), Image.Resampling.BILINEAR))


@dataclass
class TiledImage:
    tiles: torch.Tensor  # [n_tiles, 3, T, T]: rows*cols local tiles (+ 1 global if rows*cols > 1)
    grid: tuple[int, int]  # (rows, cols) of the local tiles


def preprocess_image(source, vision_config=None, max_num_tiles: int | None = None) -> TiledImage:
    """Load and tile one image for the vision encoder (see the module docstring)."""
    settings = VisionSettings.from_config(vision_config, max_num_tiles)
    image = load_image(source)
    tiles, grid = tile_image(image, settings.tile_size, settings.max_num_tiles)
    if tiles.shape[0] > 1:
        tiles = torch.cat([tiles, global_tile(image, settings.tile_size)[None]], dim=0)
    return TiledImage(tiles=tiles, grid=grid)
