"""`herd data prepare` (build the token cache, print the per-source table) and `herd data show`
(decode one packed batch, image placeholders collapsed and the digits drawn in ASCII).

    herd data prepare --tokenizer DIR [--preset tiny] [--cache-dir DIR] [--max-docs N]
    herd data show --tokenizer DIR [--split val] [--batch 3] [--rows 2]

Register with `add_data_subcommand(subparsers)`; each command returns an exit code.
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_weights(text: str) -> dict:
    """'shakespeare=0.3,digits=0.2' → {'shakespeare': 0.3, 'digits': 0.2} (argparse type)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT pairs, got {part!r}")
    return out


def _setup(args):
    from herd.data.loader import DataConfig, build_datasets
    from herd.presets import get_config
    from herd.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    config = get_config(args.preset)
    kw = dict(seq_len=args.seq_len, batch_size=args.batch_size, val_fraction=args.val_fraction,
              max_docs=args.max_docs, cache_dir=args.cache_dir, seed=args.seed)
    if args.weights:
        kw["weights"] = args.weights
    cfg = DataConfig(**kw)
    if config.vision is None:
        cfg.weights = {k: v for k, v in cfg.weights.items() if k != "digits"}
    index = config.image_token_index if config.text.vocab_size == tok.vocab_size else None
    train, val = build_datasets(tok, cfg, config.vision, index)
    return tok, cfg, train, val


def _cmd_prepare(args) -> int:
    from herd.data.cache import default_cache_dir
    from herd.data.loader import describe

    t0 = time.perf_counter()
    tok, cfg, train, _ = _setup(args)
    print(describe(train.summary))
    print(f"tokenizer {tok.name} (vocab {tok.vocab_size}); cache {cfg.cache_dir or default_cache_dir()}; "
          f"{time.perf_counter() - t0:.1f}s")
    return 0


def _ascii(tile, width: int = 14) -> list[str]:
    import numpy as np

    t = np.asarray(tile, dtype=np.float64)
    step = max(1, t.shape[0] // width)
    small = t[: step * width, : step * width].reshape(width, step, width, step).mean(axis=(1, 3))
    ramp = " .:-=+*#%@"
    return ["".join(ramp[min(int(v / 256 * len(ramp)), len(ramp) - 1)] for v in row) for row in small]


def render_row(tok, ids, labels, pad_id: int) -> str:
    """Text of one packed row: <|patch|> runs and padding collapsed, loss-free spans marked."""
    patch = tok.special_tokens.get("<|patch|>")
    out, i, n = [], 0, len(ids)
    while i < n:
        j = i
        if ids[i] == patch or (ids[i] == pad_id and labels[i] == -100 and all(x == pad_id for x in ids[i:])):
            while j < n and ids[j] == ids[i]:
                j += 1
            name = "<|patch|>" if ids[i] == patch else "<pad>"
            out.append(f"{name}×{j - i}")
        else:
            while j < n and ids[j] != patch and not (ids[j] == pad_id and all(x == pad_id for x in ids[j:])):
                j += 1
            out.append(tok.decode(ids[i:j]))
        i = j
    return "".join(out)


def _cmd_show(args) -> int:
    tok, cfg, train, val = _setup(args)
    stream = train if args.split == "train" else iter(val)
    batch = None
    for _ in range(args.batch + 1):
        batch = next(stream)
    pad_id = tok.special_tokens.get("<|finetune_right_pad|>", tok.eos_id)
    print(f"{args.split} batch {args.batch}: input_ids {tuple(batch.input_ids.shape)}, loss tokens {batch.n_tokens}, "
          f"images {batch.n_images}, pixel_values "
          f"{None if batch.pixel_values is None else tuple(batch.pixel_values.shape)}")
    tile = 0
    per_image = 1 if batch.n_images == 0 else batch.pixel_values.shape[0] // batch.n_images
    for r in range(min(args.rows, batch.input_ids.shape[0])):
        ids, labels = batch.input_ids[r].tolist(), batch.labels[r].tolist()
        segs = ", ".join(f"{s}:{d}[{a}:{b}]" for s, d, a, b in batch.segments[r])
        print(f"\n=== row {r}: {segs}")
        print(render_row(tok, ids, labels, pad_id))
        n_img = sum(1 for s, *_ in batch.segments[r] if s == "digits")
        if n_img:
            pics = []
            for k in range(n_img):
                grey = (batch.pixel_values[tile + k * per_image, 0] * 0.5 + 0.5) * 255
                pics.append(_ascii(grey.numpy()))
            print(f"--- the {n_img} image(s) of row {r}, in order:")
            for line in zip(*pics):
                print("  ".join(line))
            tile += n_img * per_image
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default="llama4", help="tokenizer dir or 'llama4' (default)")
    p.add_argument("--preset", default="tiny", help="model preset whose vision config tiles the digits (default tiny)")
    p.add_argument("--cache-dir", default=None, help="token cache (default $HERD_DATA_CACHE or ~/.cache/herd/data)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--max-docs", type=int, default=None, help="only the first N documents of each source")
    p.add_argument("--weights", type=parse_weights, default=None, help="e.g. shakespeare=0.3,python=0.5,digits=0.2")
    p.add_argument("--seed", type=int, default=0)


def add_data_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `data prepare` and `data show` on an argparse subparsers object."""
    parser = subparsers.add_parser("data", help="bundled pre-training data: build the token cache, show batches")
    sub = parser.add_subparsers(dest="data_command", metavar="{prepare,show,longctx,sft}")
    sub.required = True
    p = sub.add_parser("prepare", help="tokenise every source into the cache; print documents, bytes, tokens, split")
    _common(p)
    p.set_defaults(func=_cmd_prepare)
    p = sub.add_parser("show", help="decode one packed batch (image placeholders collapsed, digits drawn)")
    _common(p)
    p.add_argument("--split", choices=("train", "val"), default="train")
    p.add_argument("--batch", type=int, default=0, help="which batch (0 = the first)")
    p.add_argument("--rows", type=int, default=2, help="rows to print")
    p.set_defaults(func=_cmd_show)
    from herd.data.longctx import add_longctx_parser

    add_longctx_parser(sub)
    from herd.data.chat_data import add_sft_data_parser

    add_sft_data_parser(sub)
    return parser


def data_cli(argv: list[str] | None = None) -> int:
    """`herd data ARGS...` as a function."""
    parser = argparse.ArgumentParser(prog="herd")
    add_data_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(data_cli())
