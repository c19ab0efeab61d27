"""Guard metrics as pure functions: AUC, the threshold at a false-positive budget, recall / FPR / F1.

    auc(scores, labels)                      ROC AUC = P(score of a random positive > a random
                                             negative), ties counting ½ (Mann–Whitney U / n⁺n⁻)
    threshold_at_fpr(scores, labels, 0.01)   the lowest threshold t with FPR(t) ≤ 1 %, where a
                                             score ≥ t is flagged: strictly above the (k+1)-th
                                             highest negative score, k = ⌊0.01 · n⁻⌋
    binary_report(pred, labels)              recall, false-positive rate, precision, F1
    per_class_report(pred_sets, truths)      per category: precision, recall, F1, support, where an
                                             example may name several categories (a verdict's codes)

Prompt Guard 2's model card reports recall at 1 % FPR and AUC; Llama Guard 4's card reports
recall, FPR and F1. Tests check these against scikit-learn.
"""

from __future__ import annotations

import math

import torch


def auc(scores, labels) -> float:
    s = torch.as_tensor(scores, dtype=torch.float64)
    y = torch.as_tensor(labels).bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative examples")
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inv = torch.unique(s, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, ranks)
    cnt = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(ranks))
    ranks = (sums / cnt)[inv]
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def threshold_at_fpr(scores, labels, max_fpr: float = 0.01) -> float:
    s = torch.as_tensor(scores)
    if not s.is_floating_point():
        s = s.double()
    y = torch.as_tensor(labels).bool()
    neg = torch.sort(s[~y], descending=True).values
    if len(neg) == 0:
        raise ValueError("choosing a threshold at a false-positive rate needs negative examples")
    k = math.floor(max_fpr * len(neg))
    if k >= len(neg):
        return float(neg[-1])
    # the next representable value above the (k+1)-th negative, in the scores' own precision
    return float(torch.nextafter(neg[k], torch.tensor(math.inf, dtype=neg.dtype)))


def binary_report(pred, labels) -> dict:
    p = torch.as_tensor(pred).bool()
    y = torch.as_tensor(labels).bool()
    tp, fp = int((p & y).sum()), int((p & ~y).sum())
    fn, tn = int((~p & y).sum()), int((~p & ~y).sum())
    recall = tp / (tp + fn) if tp + fn else float("nan")
    fpr = fp / (fp + tn) if fp + tn else float("nan")
    precision = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {"recall": recall, "fpr": fpr, "precision": precision, "f1": f1, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def per_class_report(pred_sets, truths, classes=None) -> dict:
    """{class: precision, recall, f1, support} with several predicted classes allowed per example:
    pred_sets[i] the classes named for example i (empty for `safe`), truths[i] its class (None for
    safe). Class c's true positives are examples with truth c that name c; every other example
    naming c is a false positive (a safe prompt called S7 is a false S7). Undefined ratios are nan."""
    classes = list(classes) if classes is not None else sorted({t for t in truths if t is not None})
    out = {}
    for c in classes:
        tp = sum(c in p and t == c for p, t in zip(pred_sets, truths))
        named = sum(c in p for p in pred_sets)
        support = sum(t == c for t in truths)
        precision = tp / named if named else float("nan")
        recall = tp / support if support else float("nan")
        f1 = 2 * tp / (named + support) if named + support else float("nan")
        out[c] = {"precision": precision, "recall": recall, "f1": f1, "support": support, "named": named}
    return out
