"""The trainer's view of the data: `build_datasets` -> (train stream, validation set).

    cfg = DataConfig(seq_len=256, batch_size=8)
    train, val = build_datasets(tokenizer, cfg, vision_config=config.vision,
                                image_token_index=config.image_token_index)
    batch = next(train)                  # Batch: input_ids, labels, pixel_values, n_tokens
    state = train.state_dict()           # JSON-able; train.load_state_dict(state) resumes exactly
    for batch in val: ...                # the same cfg.val_batches batches every time
    rank_train = train.shard(rank, world_size)   # this rank's rows of every global batch

Train and validation are disjoint by document (herd.data.splits). The train stream is
infinite; each source restarts in a new order after each of its epochs. The validation set is
a fixed sample of validation documents drawn with the same mixture (seed VAL_SEED, whatever
the training seed), so validation losses of different runs compare.

Distributed: every rank plans the same global batch of batch_size rows (planning works on
lengths only and is cheap) and builds tensors for rows [rank·b, (rank+1)·b), b =
batch_size / world_size. The ranks' rows are disjoint and together are exactly the
single-process batch; the state is the same on every rank, so rank 0's state_dict resumes all.
"""

from __future__ import annotations

import copy

import numpy as np

from herd.data.packing import Batch, DigitUnits, Packer, TextUnits, materialize_rows
from herd.data.types import IGNORE_INDEX, DataConfig

VAL_SEED = 0
STATE_VERSION = 1


class PackedStream:
    """An iterator of Batches with an exact, JSON-able position (state_dict / load_state_dict)."""

    def __init__(self, units: list, probs, config: DataConfig, seed: int, stream: int, pad_id: int,
                 tiles=None, rank: int = 0, world_size: int = 1, max_batches: int | None = None):
        from herd.data.mixture import MixtureSampler

        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if config.batch_size % world_size:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by world_size {world_size}")
        self.units, self.probs, self.config = units, np.asarray(probs), config
        self.seed, self.stream, self.pad_id, self._tiles = seed, stream, pad_id, tiles
        self.rank, self.world_size, self.max_batches = rank, world_size, max_batches
        sampler = MixtureSampler([len(u) for u in units], self.probs, seed=seed, stream=stream)
        self.packer = Packer(units, sampler, config.seq_len, config.max_images_per_sequence)
        self.batches = 0
        self.val: "ValidationSet | None" = None  # the validation sibling (set by build_datasets)
        self.vocab_size = 0  # the tokenizer's (set by build_datasets)
        self.summary: list[dict] = []

    # --------------------------------------------------------------- iteration

    @property
    def local_batch_size(self) -> int:
        return self.config.batch_size // self.world_size

    @property
    def source_names(self) -> list[str]:
        return [u.name for u in self.units]

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self.max_batches is not None and self.batches >= self.max_batches:
            raise StopIteration
        rows = [self.packer.next_row() for _ in range(self.config.batch_size)]
        b = self.local_batch_size
        self.batches += 1
        return materialize_rows(self.units, rows[self.rank * b : (self.rank + 1) * b], self.config.seq_len,
                                self.pad_id, self._tiles)

    def epochs(self) -> dict[str, float]:
        """Epochs completed per source."""
        return dict(zip(self.source_names, self.packer.sampler.epochs()))

    # --------------------------------------------------------------- position

    def _identity(self) -> dict:
        c = self.config
        return {"sources": self.source_names, "units": [len(u) for u in self.units],
                "probs": [round(float(p), 12) for p in self.probs], "seq_len": c.seq_len,
                "batch_size": c.batch_size, "max_images": c.max_images_per_sequence, "seed": self.seed,
                "stream": self.stream}

    def state_dict(self) -> dict:
        """The exact position (identical on every rank)."""
        return {"version": STATE_VERSION, "batches": self.batches, "packer": self.packer.state_dict(),
                "identity": self._identity()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} is not {STATE_VERSION}")
        if state["identity"] != self._identity():
            saved = state["identity"]
            diff = {k: (v, saved.get(k)) for k, v in self._identity().items() if saved.get(k) != v}
            raise ValueError(f"data state is for different data or settings (now vs saved): {diff}")
        self.packer.load_state_dict(copy.deepcopy(state["packer"]))
        self.batches = int(state["batches"])

    def shard(self, rank: int, world_size: int) -> "PackedStream":
        """A copy at the same position that yields this rank's rows of each global batch."""
        out = PackedStream(self.units, self.probs, self.config, self.seed, self.stream, self.pad_id, self._tiles,
                           rank=rank, world_size=world_size, max_batches=self.max_batches)
        out.load_state_dict(self.state_dict())
        out.val = None if self.val is None else self.val.shard(rank, world_size)
        out.summary, out.vocab_size = self.summary, self.vocab_size
        return out

    def fresh(self) -> "PackedStream":
        """A copy of this stream at its beginning (same rank)."""
        out = PackedStream(self.units, self.probs, self.config, self.seed, self.stream, self.pad_id, self._tiles,
                           rank=self.rank, world_size=self.world_size, max_batches=self.max_batches)
        out.val, out.summary, out.vocab_size = self.val, self.summary, self.vocab_size
        return out


class ValidationSet:
    """A fixed, finite list of batches: every `iter()` starts from the beginning."""

    def __init__(self, stream: PackedStream | None):
        self._stream = stream  # None: no validation documents (val_fraction 0)

    def __iter__(self):
        return iter(()) if self._stream is None else self._stream.fresh()

    def __len__(self) -> int:
        return 0 if self._stream is None else int(self._stream.max_batches)

    def shard(self, rank: int, world_size: int) -> "ValidationSet":
        return self if self._stream is None else ValidationSet(self._stream.shard(rank, world_size).fresh())

    @property
    def source_names(self) -> list[str]:
        return [] if self._stream is None else self._stream.source_names


# ----------------------------------------------------------------------------- building


def _tokenizer(tokenizer):
    if isinstance(tokenizer, str):
        from herd.tokenizer import load_tokenizer

        return load_tokenizer(tokenizer)
    return tokenizer


def build_datasets(tokenizer, data_config: DataConfig | None = None, vision_config=None,
                   image_token_index: int | None = None, rank: int = 0, world_size: int = 1):
    """(train PackedStream, ValidationSet) for `data_config` (see the module docstring).

    tokenizer: a herd Tokenizer or what load_tokenizer accepts. vision_config: the model's
    vision config, needed when the "digits" weight is > 0. image_token_index: the model's
    <|patch|> id, checked against the tokenizer. The token cache is built on first use."""
    from herd.data.cache import digit_corpus, text_corpus
    from herd.data.images import DIGIT_SOURCES
    from herd.data.mixture import mixture_probs
    from herd.data.multimodal import DigitDocuments
    from herd.data.splits import validation_mask
    from herd.data.sources import TEXT_SOURCES

    cfg = data_config or DataConfig()
    tok = _tokenizer(tokenizer)
    bos, eos = tok.special_tokens.get("<|begin_of_text|>"), tok.special_tokens.get("<|end_of_text|>")
    if bos is None or eos is None:
        raise ValueError("the tokenizer needs <|begin_of_text|> and <|end_of_text|> special tokens")
    pad = tok.special_tokens.get("<|finetune_right_pad|>", eos)
    if image_token_index is not None and tok.special_tokens.get("<|patch|>") != int(image_token_index):
        raise ValueError(f"the model's image_token_index {image_token_index} is not the tokenizer's <|patch|> id "
                         f"{tok.special_tokens.get('<|patch|>')}: tokenizer and model config do not match")

    train_units, val_units, weights, summary = [], [], [], []
    digits = None
    for name in [*TEXT_SOURCES, "digits"]:
        w = float(cfg.weights.get(name, 0.0))
        if w <= 0:
            continue
        if name == "digits":
            if vision_config is None:
                raise ValueError("the 'digits' source needs the model's vision config (vision_config=...), "
                                 "or set its weight to 0 for a text-only model")
            digits = digit_corpus(vision_config, cfg.cache_dir, limit=cfg.max_docs,
                                  which=cfg.digit_sources or DIGIT_SOURCES)
            docs = DigitDocuments(tok, digits, vision_config, image_token_index)
            is_val = validation_mask(digits.split_keys, cfg.val_fraction)
            tr, va = DigitUnits(docs, np.flatnonzero(~is_val)), DigitUnits(docs, np.flatnonzero(is_val))
            nbytes, n_tokens, built = int(digits.tiles.size), tr.n_tokens() + va.n_tokens(), digits.built
        else:
            corpus = text_corpus(tok, name, cfg.cache_dir, limit=cfg.max_docs, progress=cfg.progress)
            is_val = validation_mask(corpus.split_keys, cfg.val_fraction)
            tr = TextUnits(corpus, np.flatnonzero(~is_val), cfg.seq_len, bos, eos)
            va = TextUnits(corpus, np.flatnonzero(is_val), cfg.seq_len, bos, eos)
            nbytes, n_tokens, built = int(corpus.nbytes.sum()), tr.n_tokens() + va.n_tokens(), corpus.built
        train_units.append(tr)
        val_units.append(va)
        weights.append(w)
        summary.append({"source": name, "docs": int(len(is_val)), "bytes": nbytes, "tokens": n_tokens,
                        "train_docs": int((~is_val).sum()), "val_docs": int(is_val.sum()),
                        "train_tokens": tr.n_tokens(), "val_tokens": va.n_tokens(), "weight": w, "cached": not built})

    def tiles(s, doc_indices):
        return np.asarray(digits.tiles[doc_indices]).reshape(-1, *digits.tiles.shape[2:])

    def probs_for(units):
        keep = [w if len(u) else 0.0 for u, w in zip(units, weights)]
        if sum(keep) <= 0:
            raise ValueError("no documents to draw from (every weighted source is empty in this split)")
        return mixture_probs(keep, [u.mean_tokens() or 1.0 for u in units])

    train = PackedStream(train_units, probs_for(train_units), cfg, seed=cfg.seed, stream=0, pad_id=pad, tiles=tiles)
    val_stream = None
    if any(len(u) for u in val_units) and cfg.val_batches > 0:
        val_stream = PackedStream(val_units, probs_for(val_units), cfg, seed=VAL_SEED, stream=1, pad_id=pad,
                                  tiles=tiles, max_batches=cfg.val_batches)
        val_stream.vocab_size = tok.vocab_size
    train.vocab_size = tok.vocab_size
    train.val, train.summary = ValidationSet(val_stream), summary
    if world_size != 1 or rank != 0:
        train = train.shard(rank, world_size)
    return train, train.val


# ----------------------------------------------------------------------------- baselines


def unigram_baseline(train: PackedStream, val=None, max_train_tokens: int = 2_000_000, smoothing: float = 1.0) -> float:
    """Cross-entropy (nats/token) on the validation labels of a unigram model fitted on the
    training labels (the first `max_train_tokens` loss tokens of a fresh copy of `train`),
    with add-`smoothing` counts over the whole vocabulary. A model that learnt anything
    beyond token frequencies has a validation loss well below it."""
    val = val if val is not None else train.val
    if val is None or len(val) == 0:
        raise ValueError("no validation batches (val_fraction 0?): pass val=...")
    vocab = int(train.vocab_size)
    counts = np.zeros(vocab, dtype=np.int64)
    stream, seen = train.fresh(), 0
    while seen < max_train_tokens:
        batch = next(stream)
        lab = batch.labels[batch.labels != IGNORE_INDEX].numpy()
        counts += np.bincount(lab, minlength=vocab)[:vocab]
        seen += len(lab)
    val_labels = np.concatenate([b.labels[b.labels != IGNORE_INDEX].numpy() for b in val])
    if len(val_labels) == 0:
        raise ValueError("the validation set has no loss tokens")
    p = (counts + smoothing) / (counts.sum() + smoothing * vocab)
    return float(-np.log(p[val_labels]).mean())


def training_texts(names=None, val_fraction: float = DataConfig.val_fraction, limit: int | None = None):
    """Texts of the training documents of the text sources (e.g. to train a tokenizer without
    ever seeing validation text). names: text sources (default all)."""
    from herd.data.sources import TEXT_SOURCES, load_documents
    from herd.data.splits import validation_mask

    for name in names or TEXT_SOURCES:
        docs = load_documents(name, limit=limit)
        is_val = validation_mask([d.key for d in docs], val_fraction)
        for d, v in zip(docs, is_val):
            if not v:
                yield d.text


def describe(summary: list[dict]) -> str:
    """The per-source table `herd data prepare` prints (tokens include each document's BOS and
    EOS; MB of digits is their uint8 tiles)."""
    head = f"{'source':<12} {'docs':>6} {'MB':>7} {'tokens':>11} {'train docs':>10} {'val docs':>8} " \
           f"{'train tokens':>12} {'val tokens':>10} {'weight':>6}  cache"
    lines = [head, "-" * len(head)]
    tot = {k: 0 for k in ("docs", "bytes", "tokens", "train_docs", "val_docs", "train_tokens", "val_tokens")}
    for r in summary:
        lines.append(f"{r['source']:<12} {r['docs']:>6} {r['bytes'] / 1e6:>7.2f} {r['tokens']:>11,} {r['train_docs']:>10} "
                     f"{r['val_docs']:>8} {r['train_tokens']:>12,} {r['val_tokens']:>10,} {r['weight']:>6.2f}  "
                     f"{'reused' if r['cached'] else 'built'}")
        for k in tot:
            tot[k] += r[k]
    lines.append("-" * len(head))
    lines.append(f"{'total':<12} {tot['docs']:>6} {tot['bytes'] / 1e6:>7.2f} {tot['tokens']:>11,} {tot['train_docs']:>10} "
                 f"{tot['val_docs']:>8} {tot['train_tokens']:>12,} {tot['val_tokens']:>10,}")
    return "\n".join(lines)
