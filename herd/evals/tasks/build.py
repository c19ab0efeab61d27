"""Build the offline lm-eval task data herd ships (herd/evals/tasks/data/*.json).

    python -m herd.evals.tasks.build        # rewrites the JSON files; deterministic (seeded)

Every item comes from text a herd model never trains on: the held-out half of herd's own split
(herd.data.splits, the same 5% validation documents `herd train` holds out), or, for arithmetic,
freshly generated problems (reasoning-gym `basic_arithmetic`, seeded).

    cloze_shakespeare / cloze_kjv  multiple choice: two lines (21-200 characters) of a held-out scene / chapter, and
                                   the true next line against 3 lines drawn from other held-out
                                   documents (acc, acc_norm; chance 25%)
    ppl                            the first 1,200 characters of held-out Shakespeare and KJV
                                   documents, for loglikelihood_rolling (word/byte perplexity)
    arith                          reasoning-gym basic_arithmetic: "Calculate 5 - 3 - 6." → -4
    needle                         RULER-lite: a "special magic number" sentence hidden at a
                                   recorded depth in ~250 words of held-out KJV, then the question
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).with_name("data")
N_ITEMS = 100


def held_out(source: str) -> list[str]:
    from herd.data.sources import load_documents
    from herd.data.splits import validation_mask
    from herd.data.types import DataConfig

    docs = load_documents(source)
    mask = validation_mask([d.split_key or d.doc_id for d in docs], DataConfig().val_fraction)
    return [d.text for d, m in zip(docs, mask) if m]


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if 20 < len(ln.strip()) <= 200]


def cloze(source: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    docs = [_lines(t) for t in held_out(source)]
    docs = [d for d in docs if len(d) >= 4]
    pool = [(i, ln) for i, d in enumerate(docs) for ln in d]
    items = []
    while len(items) < N_ITEMS:
        i = rng.randrange(len(docs))
        j = rng.randrange(2, len(docs[i]))
        gold = docs[i][j]
        others = []
        while len(others) < 3:
            k, ln = pool[rng.randrange(len(pool))]
            if k != i and ln not in others:
                others.append(ln)
        label = rng.randrange(4)
        choices = others[:label] + [gold] + others[label:]
        items.append({"context": "\n".join(docs[i][j - 2:j]) + "\n", "choices": choices, "label": label})
    return items


def ppl(seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for source in ("shakespeare", "bible"):
        texts = held_out(source)
        for t in rng.sample(texts, min(10, len(texts))):
            out.append({"source": source, "text": t[:1200]})
    return out


def arith(seed: int) -> list[dict]:
    import reasoning_gym

    ds = reasoning_gym.create_dataset("basic_arithmetic", size=N_ITEMS, seed=seed)
    return [{"question": x["question"], "answer": str(x["answer"])} for x in ds]


def needle(seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = " ".join(held_out("bible")).split()
    keys = ["apple", "river", "lantern", "copper", "meadow", "falcon", "harbor", "violet", "ember", "willow"]
    items = []
    for n in range(50):
        a = rng.randrange(len(words) - 300)
        hay = words[a:a + 250]
        key, value = keys[n % len(keys)], str(rng.randrange(10**6, 10**7))
        depth = rng.choice([0.1, 0.3, 0.5, 0.7, 0.9])
        at = int(depth * len(hay))
        text = " ".join(hay[:at] + [f"The special magic number for {key} is {value}."] + hay[at:])
        items.append({"context": text, "key": key, "answer": value, "depth": depth})
    return items


def main() -> None:
    DATA.mkdir(exist_ok=True)
    files = {"cloze_shakespeare": cloze("shakespeare", 1), "cloze_kjv": cloze("bible", 2), "ppl": ppl(3),
             "arith": arith(4), "needle": needle(5)}
    for name, items in files.items():
        (DATA / f"{name}.json").write_text(json.dumps(items, indent=0, ensure_ascii=False) + "\n")
        print(f"{name}: {len(items)} items")


if __name__ == "__main__":
    main()
