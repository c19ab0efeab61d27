"""Helpers for benchmarks that run the trainer several times on a shared tokenizer and data cache."""

from __future__ import annotations

import json
from pathlib import Path

from herd.train.trainer import TrainConfig, train


def shared_assets(root: Path) -> dict:
    """Train the tiny preset's tokenizer once (on the training split) and share one data cache."""
    import herd
    from herd.data import training_texts
    from herd.tokenizer_train import train_tokenizer

    tok = root / "tokenizer"
    if not (tok / "tokenizer.json").exists():
        train_tokenizer(training_texts(), herd.get_config("tiny").text.vocab_size, tok)
    return {"tokenizer": str(tok), "data_cache": str(root / "data_cache")}


def run(out: Path, assets: dict, **kw) -> list[dict]:
    """One training run; returns its metrics rows."""
    cfg = TrainConfig(out=str(out), progress=False, ckpt_every=10**9, keep=1, **assets, **kw)
    train(cfg)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
