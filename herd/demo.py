"""`herd demo`: the most complete path through the model that runs in seconds on a CPU.

Builds a model (random weights for a preset, or loads a directory), prints its parameter table,
draws an image, runs text and the image through the model with early fusion, checks that the
image tokens were replaced by image features, and saves/loads the model in the Hugging Face layout.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch


def draw_image(size: int = 96) -> "np.ndarray":
    """A synthetic RGB picture (a ring on a gradient), uint8 [size, size, 3]."""
    y, x = np.mgrid[0:size, 0:size] / size
    r = np.hypot(x - 0.5, y - 0.5)
    ring = (np.abs(r - 0.3) < 0.06).astype(np.float32)
    img = np.stack([x, y, 1 - ring], axis=-1) * 255
    return img.astype(np.uint8)


def image_to_tile(img: "np.ndarray", tile: int) -> torch.Tensor:
    """uint8 [H, W, 3] → one normalised tile [1, 3, tile, tile] (mean 0.5, std 0.5)."""
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
    t = torch.nn.functional.interpolate(t, size=(tile, tile), mode="bilinear", antialias=True, align_corners=False)
    return (t - 0.5) / 0.5


def run_demo(args) -> int:
    import herd
    from herd.params import count_params, params_table

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = herd.load_model(args.model)
    cfg = model.config
    print(params_table(args.model, count_params(cfg)))
    print(f"\nbuilt {args.model} in {time.perf_counter() - t0:.2f}s")

    tc = cfg.text
    prompt = torch.randint(0, min(tc.vocab_size, tc.bos_token_id or tc.vocab_size), (1, 24))
    with torch.no_grad():
        logits = model(prompt)
    print(f"text: input_ids {tuple(prompt.shape)} → logits {tuple(logits.shape)}")

    if cfg.vision is not None:
        pixels = image_to_tile(draw_image(), cfg.vision.image_size)  # [1, 3, S, S]
        n = cfg.vision.tokens_per_tile
        ids = torch.cat([prompt[:, :4], torch.full((1, n), cfg.image_token_index), prompt[:, 4:]], dim=1)
        with torch.no_grad():
            fused = model.embed(ids, pixels)
            logits_img = model(ids, pixel_values=pixels)
        table = model.language_model.model.embed_tokens.weight.detach()
        replaced = (fused[0, 4:4 + n] - table[cfg.image_token_index]).abs().sum()
        print(f"image: 1 tile {tuple(pixels.shape)} → {n} <|patch|> tokens replaced by image features "
              f"(|Δ| = {float(replaced):.2f}); logits {tuple(logits_img.shape)}")
        top = logits_img[0, -1].topk(5).indices.tolist()
        print(f"greedy next-token candidates after the image prompt: {top}")

    with tempfile.TemporaryDirectory() as d:
        herd.save_model(model, d)
        again = herd.load_model(d)
        with torch.no_grad():
            same = torch.equal(again(prompt), logits)
        print(f"saved to a Hugging Face directory and reloaded: logits identical = {same}")
    return 0 if same else 1
