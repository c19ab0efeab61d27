"""Why does the tiny Llama Guard not name the category? Probes of a trained guard's verdict position.

    python benchmarks/guard_categories.py runs/tiny-guard [runs/tiny-guard-v2 ...] [--out RESULTS.json]
    python benchmarks/guard_categories.py --table runs/tiny-guard ...   # per S-code table from guard_eval.json
    python benchmarks/guard_categories.py --head-sim DIR                # can a head alone learn to read DIR's states?

The guard answers `unsafe\\nS<k>`; the code token S<k> is predicted from the hidden state at the
position of `S` (teacher-forced: prompt + `unsafe\\nS`). For each model directory this script
reads, on the unsafe prompts of herd.safety.train_llama_guard's train and test splits:

  * head:  the model's own choice among the code tokens S1–S14 at that position (the
           teacher-forced category accuracy, as train_llama_guard.category_accuracy);
  * probe: a class-balanced logistic regression (scikit-learn) fitted on the *same* final hidden
           state [H] of the training prompts, scored on the test prompts. If the probe names the
           category and the head does not, the information reaches the verdict position and only
           the head/last step is untrained (optimisation); if the probe is near the majority
           class too, the message's topic never reaches the verdict position (the attention from
           the end of a ~200-token prompt back to the ~20-token message is not learned);
  * pool:  the same probe on the last layer's states mean-pooled over the message's own tokens
           (what the model encodes about the topic where the topic is written);
  * code loss: the mean cross-entropy of the code token under the head, against the entropy of
           the training prior over codes (the loss a model that ignores the message reaches).

Baseline beside them: train_llama_guard.bag_of_words_categories (TF-IDF + logistic regression on
the message text). Writes one JSON object per model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def features(model_dir: str, examples: list[dict], batch: int = 32) -> dict:
    """Per unsafe example: final hidden state at the code-predicting position [H], the last layer's
    states mean-pooled over the message tokens [H], and log-probs of the code tokens [14]."""
    import torch

    from herd.chat import encode_messages
    from herd.model.weights import load_model
    from herd.safety.llama_guard import guard_messages
    from herd.safety.train_llama_guard import encode_example
    from herd.safety.verdict import CATEGORY_NAMES
    from herd.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float32).eval()
    head = tok.encode("unsafe\nS")
    code_ids = []
    for c in CATEGORY_NAMES:
        tail = tok.encode("unsafe\n" + c)[len(head):]
        if len(tail) != 1:
            raise ValueError(f"{model_dir}: code {c} is {len(tail)} tokens after 'unsafe\\nS'; this probe needs one")
        code_ids.append(tail[0])
    rows = []
    for e in examples:
        ids, start = encode_example(tok, e)
        prefix = ids[:start + len(head)]
        # the message's span: the prompt rendered with a one-character message, compared token by token
        empty = dict(e, messages=[dict(e["messages"][-1], content="~")])
        ids0, _ = encode_messages(tok, guard_messages(empty["messages"]), add_generation_prompt=True)
        a = next(i for i, (p, q) in enumerate(zip(prefix, ids0)) if p != q)
        b = len(prefix) - next(i for i, (p, q) in enumerate(zip(prefix[::-1], ids0[::-1] + [-1])) if p != q)
        rows.append((prefix, a, max(a + 1, b)))
    out = {"hidden": [], "pooled": [], "code_logp": []}
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            x = torch.zeros(len(chunk), max(len(r[0]) for r in chunk), dtype=torch.long)  # [B, T] right-padded
            for r, (p, _, _) in enumerate(chunk):
                x[r, :len(p)] = torch.tensor(p)
            h, w = model(x, apply_head=lambda h, w: (h, w))  # h [B, T, H] normed, w [V, H]
            for r, (p, a, b) in enumerate(chunk):
                last = h[r, len(p) - 1]  # [H] the position whose next token is the code
                out["hidden"].append(last.tolist())
                out["pooled"].append(h[r, a:b].mean(0).tolist())
                out["code_logp"].append(torch.log_softmax(last @ w.t(), -1)[code_ids].tolist())
    return out


def probe(x_train, y_train, x_test, y_test) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(x_train)
    clf = LogisticRegression(C=1.0, max_iter=5000, class_weight="balanced").fit(sc.transform(x_train), y_train)
    pred = clf.predict(sc.transform(x_test))
    return {"accuracy": sum(p == t for p, t in zip(pred, y_test)) / len(y_test)}


def diagnose(model_dir: str, data: dict) -> dict:
    from herd.safety.verdict import CATEGORY_NAMES

    codes = list(CATEGORY_NAMES)
    tr = [e for e in data["train"] if e["kind"] == "prompt" and e["code"] is not None]
    te = [e for e in data["test"] if e["kind"] == "prompt" and e["code"] is not None]
    t0 = time.time()
    ftr, fte = features(model_dir, tr), features(model_dir, te)
    ytr, yte = [e["code"] for e in tr], [e["code"] for e in te]
    prior = Counter(ytr)
    entropy = -sum(n / len(ytr) * math.log(n / len(ytr)) for n in prior.values())
    head_pred = [codes[max(range(len(codes)), key=lp.__getitem__)] for lp in fte["code_logp"]]
    code_loss = {split: -sum(lp[codes.index(y)] for lp, y in zip(f["code_logp"], ys)) / len(ys)
                 for split, f, ys in (("train", ftr, ytr), ("test", fte, yte))}
    return {
        "model": model_dir, "n_train": len(ytr), "n_test": len(yte),
        "majority_class": Counter(yte).most_common(1)[0][1] / len(yte),
        "head_accuracy": sum(p == t for p, t in zip(head_pred, yte)) / len(yte),
        "head_predicted": dict(Counter(head_pred)),
        "code_loss": code_loss, "prior_entropy_train": entropy,
        "probe_verdict_position": probe(ftr["hidden"], ytr, fte["hidden"], yte),
        "probe_message_mean": probe(ftr["pooled"], ytr, fte["pooled"], yte),
        "seconds": round(time.time() - t0, 1),
    }


def head_by_gradient(model_dir: str, data: dict, steps: int = 2000, lrs=(1e-2, 3e-2, 1e-1)) -> list[dict]:
    """Can gradient descent read the category off the frozen verdict-position states? The 14 code
    rows of the model's LM head, trained alone by full-batch AdamW (betas 0.9/0.95, weight decay
    0.1) on the training prompts' states, raw (as the head sees them) or centred (the mean state
    subtracted), scored on the test prompts at 300 and `steps` steps. The probe above fits the same
    states standardised and to convergence; the gap is the conditioning the fine-tune has to beat."""
    import torch
    from safetensors.torch import load_file

    from herd.safety.verdict import CATEGORY_NAMES
    from herd.tokenizer import load_tokenizer

    codes = list(CATEGORY_NAMES)
    tr = [e for e in data["train"] if e["kind"] == "prompt" and e["code"] is not None]
    te = [e for e in data["test"] if e["kind"] == "prompt" and e["code"] is not None]
    xtr, xte = (torch.tensor(features(model_dir, es)["hidden"]) for es in (tr, te))  # [N, H]
    ytr, yte = (torch.tensor([codes.index(e["code"]) for e in es]) for es in (tr, te))
    tok = load_tokenizer(model_dir)
    head = tok.encode("unsafe\nS")
    ids = [tok.encode("unsafe\n" + c)[len(head)] for c in codes]
    w0 = load_file(str(Path(model_dir) / "model.safetensors"))["lm_head.weight"].float()[ids]  # [14, H]
    print(f"{model_dir}: |mean state| {xtr.mean(0).norm():.2f}, mean |state - mean| "
          f"{(xtr - xtr.mean(0)).norm(dim=1).mean():.2f}")
    out = []
    mu = xtr.mean(0)
    for name, a, b in (("raw", xtr, xte), ("centred", xtr - mu, xte - mu)):
        for lr in lrs:
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.AdamW([w], lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
            acc = {}
            for step in range(1, steps + 1):
                loss = torch.nn.functional.cross_entropy(a @ w.t(), ytr)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step in (300, steps):
                    with torch.no_grad():
                        acc[step] = float(((b @ w.t()).argmax(1) == yte).float().mean())
            out.append({"features": name, "lr": lr, "test_accuracy": acc})
            print(json.dumps(out[-1]))
    return out


def tables(model_dirs: list[str], data: dict, bow: dict) -> dict:
    """Per S-code tables from each run's guard_eval.json (the verdicts it generated on the held-out
    prompts), scored against the current labels (herd.data.safety_data, hand labels included)."""
    from herd.safety.metrics import binary_report, per_class_report
    from herd.safety.train_llama_guard import category_table

    truth = {e["id"]: e["code"] for e in data["test"] if e["kind"] == "prompt"}
    out = {}
    for m in model_dirs:
        rows = [r for r in json.loads((Path(m) / "guard_eval.json").read_text())["rows"] if r["kind"] == "prompt"]
        y = [truth[r["id"]] for r in rows]
        per = per_class_report([r["codes"] for r in rows], y, sorted({c for c in y if c}, key=lambda c: int(c[1:])))
        verdict = binary_report([r["decision"] == "block" for r in rows], [c is not None for c in y])
        out[m] = {"per_code": per, "verdict": verdict, "table": category_table(per, bow, verdict["f1"])}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="tiny-guard run directories")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--limit", type=int, default=None, help="first N unsafe prompts per split (smoke run)")
    ap.add_argument("--head-sim", action="store_true", help="only head_by_gradient on each model")
    ap.add_argument("--table", action="store_true", help="only the per-code tables from each run's guard_eval.json")
    args = ap.parse_args(argv)
    from benchmarks.common import setup_threads
    from herd.safety import train_llama_guard as t

    setup_threads()
    data = t.build_examples()
    if args.limit:
        data = {k: [e for e in v if e["kind"] == "prompt" and e["code"]][:args.limit] for k, v in data.items()}
    results = {"bag_of_words": t.bag_of_words_categories(data), "models": []}
    print(f"bag of words: {results['bag_of_words']['accuracy']:.3f}")
    if args.head_sim:
        results["head_by_gradient"] = {m: head_by_gradient(m, data) for m in args.models}
        args.models = []
    if args.table:
        results["tables"] = tables(args.models, data, results["bag_of_words"])
        for m, t in results["tables"].items():
            print(f"\n{m}\n{t['table']}")
        args.models = []
    for m in args.models:
        r = diagnose(m, data)
        results["models"].append(r)
        print(json.dumps(r))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
