"""herd.image: tiles equal to llama-models' transforms, and safe image loading.

Reference tiles come from llama-models' VariableSizeImageTransform and
ResizeNormalizeImageTransform, run once for the module in the oracle venv.
"""

import base64
import io
import struct
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from herd.image import (
    VisionSettings,
    best_canvas,
    candidate_canvases,
    global_tile,
    load_image,
    preprocess_image,
    tile_image,
)

sys.path.insert(0, str(Path(__file__).resolve().parent / "oracle"))
from oracle_runner import run_oracle  # noqa: E402


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise, so resampling errors show: uint8 [H, W, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / max(width, 1), y / max(height, 1), ((x + y) % 97) / 97], axis=-1) * 200
    noise = rng.integers(0, 55, size=(height, width, 3))
    return (base + noise).clip(0, 255).astype(np.uint8)


def make_images(folder: Path) -> dict[str, Path]:
    """The shapes the parity test covers, saved as PNG (lossless)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {
        "tall": Image.fromarray(_pattern(240, 1100, 1)),
        "wide": Image.fromarray(_pattern(1300, 180, 2)),
        "tiny": Image.fromarray(_pattern(7, 5, 3)),
        "huge": Image.fromarray(_pattern(4032, 3024, 4)),
        "square": Image.fromarray(_pattern(336, 336, 5)),
        "odd": Image.fromarray(_pattern(1001, 667, 6)),
        "gray": Image.fromarray(_pattern(500, 375, 7)[..., 0], mode="L"),
    }
    rgba = np.concatenate([_pattern(400, 300, 8), _pattern(400, 300, 9)[..., :1]], axis=-1)
    rgba[:40, :40, 3] = 0  # fully transparent corner
    images["rgba"] = Image.fromarray(rgba, mode="RGBA")
    paths = {}
    for name, image in images.items():
        paths[name] = folder / f"{name}.png"
        image.save(paths[name], compress_level=1)
    return paths


# (tile size, max tiles): the published setting and tiny-model settings.
CONFIGS = [(336, 16), (28, 4), (32, 8)]


@pytest.fixture(scope="module")
def image_cases(tmp_path_factory):
    work = tmp_path_factory.mktemp("image_oracle")
    paths = make_images(work / "images")
    cases = [
        {"name": name, "path": str(path), "tile_size": tile, "max_num_tiles": max_tiles}
        for name, path in paths.items()
        for tile, max_tiles in CONFIGS
    ]
    _, out_dir = run_oracle({"images": cases}, work)
    return [(case, np.load(out_dir / f"image_{i}.npz")) for i, case in enumerate(cases)]


def test_tiles_match_llama_models(image_cases):
    shapes = set()
    for case, ref in image_cases:
        image = load_image(case["path"])
        tiles, grid = tile_image(image, case["tile_size"], case["max_num_tiles"])
        label = f"{case['name']} @ {case['tile_size']}px x{case['max_num_tiles']}"
        assert tuple(grid) == tuple(ref["grid"]), label
        assert tiles.dtype == torch.float32 and tiles.shape == ref["tiles"].shape, label
        np.testing.assert_allclose(tiles.numpy(), ref["tiles"], rtol=0, atol=1e-5, err_msg=label)
        glob = global_tile(image, case["tile_size"])
        np.testing.assert_allclose(glob.numpy(), ref["global_tile"], rtol=0, atol=1e-5, err_msg=label)
        shapes.add(case["name"])
    assert {"tall", "wide", "tiny", "huge", "rgba", "gray"} <= shapes
    grids = {tuple(ref["grid"]) for _, ref in image_cases}
    assert len(grids) > 4  # the cases exercise many different grids


def test_preprocess_image_appends_global_tile(tmp_path):
    settings = VisionSettings.from_config(SimpleNamespace(image_size=28, patch_size=7, pixel_shuffle_ratio=0.5))
    wide = Image.fromarray(_pattern(120, 30, 0))
    out = preprocess_image(wide, settings)
    rows, cols = out.grid
    assert rows * cols > 1 and out.tiles.shape == (rows * cols + 1, 3, 28, 28)
    assert torch.equal(out.tiles[-1], global_tile(load_image(wide), 28))
    single = preprocess_image(Image.fromarray(_pattern(20, 20, 0)), settings)
    assert single.grid == (1, 1) and single.tiles.shape == (1, 3, 28, 28)
    assert float(single.tiles.min()) >= -1 and float(single.tiles.max()) <= 1
    # The 20x20 image is upscaled to 28x28, so no black padding is left.
    assert (single.tiles == -1).all(dim=0).float().mean() < 0.05


def test_padding_is_black_and_image_is_top_left():
    image = Image.new("RGB", (50, 20), (255, 255, 255))
    # Canvas 64 x 32 (2 tiles wide); upscaling stops at the tile side, so the image stays 50 x 20.
    tiles, grid = tile_image(image, 32, 4)
    assert grid == (1, 2) and tiles.shape == (2, 3, 32, 32)
    canvas = torch.cat(list(tiles), dim=2)  # [3, 32, 64]
    assert torch.all(canvas[:, :20, :50] == 1.0)
    assert torch.all(canvas[:, 20:] == -1.0) and torch.all(canvas[:, :, 50:] == -1.0)


def test_canvas_choice():
    canvases = candidate_canvases(4, 10)
    assert set(canvases) == {(10, 10), (10, 20), (20, 10), (20, 20), (10, 30), (30, 10), (10, 40), (40, 10)}
    all16 = candidate_canvases(16, 336)
    assert len(all16) == len(set(all16)) == sum(1 for n in range(1, 17) for a in range(1, n + 1) if n % a == 0)
    assert all16[0] == (336, 16 * 336)  # reference order: 16 tiles first
    assert best_canvas((15, 15), canvases) == (20, 20)  # least upscaling >= 1
    assert best_canvas((400, 100), canvases) == (40, 10)  # no upscaling possible: least downscaling
    assert best_canvas((200, 100), canvases) == (20, 10)  # equal scales (0.1): smallest area
    assert best_canvas((10, 20), canvases) == (10, 20)  # exact fit
    assert best_canvas((5, 5), canvases, to_max_canvas=True) == (20, 20)


def test_vision_settings_from_config():
    default = VisionSettings.from_config(None)
    assert (default.tile_size, default.patch_size, default.max_num_tiles, default.tokens_per_tile) == (336, 14, 16, 144)
    tiny = VisionSettings.from_config({"image_size": 28, "patch_size": 7, "pixel_shuffle_ratio": 0.5, "max_num_tiles": 4})
    assert (tiny.tokens_per_tile, tiny.max_num_tiles) == (4, 4)
    assert VisionSettings.from_config(SimpleNamespace(image_size=32, patch_size=8, pixel_shuffle_ratio=0.5)).tokens_per_tile == 4
    unset = SimpleNamespace(image_size=28, patch_size=7, pixel_shuffle_ratio=0.5, max_num_tiles=None)
    assert VisionSettings.from_config(unset).max_num_tiles == 16
    assert VisionSettings.from_config(unset, max_num_tiles=2).max_num_tiles == 2
    with pytest.raises(ValueError, match="multiple of patch size"):
        VisionSettings.from_config(SimpleNamespace(image_size=30, patch_size=7, pixel_shuffle_ratio=0.5))
    with pytest.raises(ValueError, match="has no 'patch_size'"):
        VisionSettings.from_config(SimpleNamespace(image_size=28, pixel_shuffle_ratio=0.5))


# ----------------------------------------------------------------------------- loading


def _png_bytes(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_all_sources_load_the_same_pixels(tmp_path):
    image = Image.fromarray(_pattern(64, 48, 11))
    data = _png_bytes(image)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    expected = np.asarray(image)
    for source in (image, str(path), path, data, bytearray(data), url, f"file://{path}", io.BytesIO(data)):
        loaded = load_image(source)
        assert loaded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(loaded), expected)


def test_exif_orientation_is_honoured():
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red, right half blue
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate 90 degrees clockwise
    data = _png_bytes(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95)
    loaded = np.asarray(load_image(data))
    assert loaded.shape == (40, 20, 3)
    assert loaded[5, 10, 0] > 200 and loaded[35, 10, 2] > 200  # red on top, blue below


def test_transparency_is_composited_on_white():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255  # red ...
    rgba[:, 5:, 3] = 255  # ... opaque on the right, fully transparent on the left
    for image in (Image.fromarray(rgba, "RGBA"), Image.fromarray(rgba, "RGBA").convert("LA")):
        loaded = np.asarray(load_image(image))
        assert (loaded[:, :5] == 255).all()  # white where transparent
        assert (loaded[:, 5:] == np.asarray(image.convert("RGB"))[:, 5:]).all()


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG file that claims width x height pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_bad_images_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="larger than the limit"):
        load_image(_png_header_only(10_000, 10_000))  # 100 Mpx: over the limit, never decoded
    with pytest.raises(ValueError, match="too large|larger than"):
        load_image(_png_header_only(100_000, 100_000))  # Pillow's own bomb error
    with pytest.raises(ValueError, match="larger than the limit"):
        load_image(Image.new("RGB", (100, 100)), max_pixels=5_000)
    data = _png_bytes(Image.fromarray(_pattern(200, 200, 1)))
    with pytest.raises(ValueError, match="truncated"):
        load_image(data[: len(data) // 2])
    jpeg = _png_bytes(Image.fromarray(_pattern(200, 200, 1)), "JPEG")
    with pytest.raises(ValueError, match="truncated"):
        load_image(jpeg[: len(jpeg) // 2])
    with pytest.raises(ValueError, match="not an image"):
        load_image(b"definitely not an image")
    with pytest.raises(ValueError, match="not found"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="data URL|base64"):
        load_image("data:image/png;base64,@@@not-base64@@@")
    with pytest.raises(ValueError, match="only local paths"):
        load_image("https://example.com/cat.png")
    with pytest.raises(ValueError, match="expected a PIL image"):
        load_image(12345)
