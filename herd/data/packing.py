"""Packing documents into fixed-length rows: BOS/EOS at document boundaries, shifted labels.

Every document is the sequence D = <|begin_of_text|> tokens <|end_of_text|>. Text documents are
cut into *units* of at most seq_len tokens of D (long files become many units, drawn
independently, so one big file never fills a whole batch). Image documents are one *atomic*
unit each. A row of seq_len tokens is filled with units in the mixture's order:

  1. deferred image units first (those that did not fit the previous row), while they fit
     and the row holds at most `max_images` images;
  2. then the rest of a text unit the previous row had to cut (its *carry*);
  3. then new units: a text unit is cut at the row's end (the rest carries over); an image
     unit that does not fit whole, or would exceed max_images, is deferred. Once as many
     units are deferred as one row can take, the row is closed with padding.

So images are never cut by a row boundary, no token is dropped, and padding is rare.

Labels are already shifted: labels[t] is the target of input_ids[t], the next token *of the
same document* (also across a cut: the last position of a cut unit predicts the token that
begins the continuation). IGNORE_INDEX (-100) marks no loss: the <|end_of_text|> position (its
target would belong to another document), positions whose target is an image-layout token
(<|patch|> etc.), and padding. <|begin_of_text|> is never a target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from herd.data.types import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


@dataclass
class Batch:
    """One batch for the model: labels already shifted, -100 where no loss."""

    input_ids: "torch.Tensor"  # [B, T] long
    labels: "torch.Tensor"  # [B, T] long
    pixel_values: "torch.Tensor | None"  # [n_tiles, 3, S, S] float32, in <|patch|>-run order
    n_tokens: int  # positions with a label (!= -100)
    n_images: int = 0
    # Per row: (source, doc_id, start, end) of each unit piece, start/end within <bos> doc <eos>.
    segments: list = field(default_factory=list, repr=False)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(mv(self.input_ids), mv(self.labels), mv(self.pixel_values), self.n_tokens, self.n_images,
                     self.segments)


class TextUnits:
    """The units of a text corpus's selected documents: pieces of <bos> doc <eos> of at most
    `piece_len` tokens. Unit i is (doc[i], start[i], end[i])."""

    atomic = False
    images_per_unit = 0

    def __init__(self, corpus, doc_indices: np.ndarray, piece_len: int, bos_id: int, eos_id: int):
        self.corpus, self.name = corpus, corpus.name
        self.bos_id, self.eos_id = int(bos_id), int(eos_id)
        docs = np.asarray(doc_indices, dtype=np.int64)
        full = corpus.doc_lengths()[docs] + 2  # with BOS and EOS
        n_pieces = -(-full // piece_len)
        self.doc = np.repeat(docs, n_pieces)
        first = np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
        self.start = (np.arange(len(self.doc)) - first) * piece_len
        self.end = np.minimum(self.start + piece_len, np.repeat(full, n_pieces))
        self.doc_indices = docs

    def __len__(self) -> int:
        return len(self.doc)

    def unit(self, i: int) -> tuple[int, int, int]:
        return int(self.doc[i]), int(self.start[i]), int(self.end[i])

    def mean_tokens(self) -> float:
        return float((self.end - self.start).mean()) if len(self) else 0.0

    def n_tokens(self) -> int:
        return int((self.end - self.start).sum())

    def _full(self, doc: int, lo: int, hi: int) -> np.ndarray:
        """D[lo:hi] of D = <bos> tokens <eos>, as int64."""
        toks = self.corpus.doc(doc)
        n = len(toks)
        out = np.empty(hi - lo, dtype=np.int64)
        a, b = max(lo, 1), min(hi, n + 1)
        if b > a:
            out[a - lo : b - lo] = toks[a - 1 : b - 1]
        if lo == 0 and hi > 0:
            out[0] = self.bos_id
        if hi == n + 2 and hi > lo:
            out[-1] = self.eos_id
        return out

    def materialize(self, doc: int, start: int, end: int):
        """(tokens, labels, image indices) of D[start:end]."""
        full_len = len(self.corpus.doc(doc)) + 2
        tokens = self._full(doc, start, end)
        labels = np.full(end - start, IGNORE_INDEX, dtype=np.int64)
        hi = min(end + 1, full_len)
        labels[: hi - start - 1] = self._full(doc, start + 1, hi)  # the EOS position keeps -100
        return tokens, labels, []

    def doc_id(self, doc: int) -> str:
        return self.corpus.doc_ids[doc]


class DigitUnits:
    """One atomic unit per selected image document (see herd.data.multimodal)."""

    atomic = True
    images_per_unit = 1

    def __init__(self, documents, doc_indices: np.ndarray):
        self.documents, self.corpus, self.name = documents, documents.corpus, documents.corpus.name
        self.doc = np.asarray(doc_indices, dtype=np.int64)
        self.length = documents.lengths(self.doc)

    def __len__(self) -> int:
        return len(self.doc)

    def unit(self, i: int) -> tuple[int, int, int]:
        return int(self.doc[i]), 0, int(self.length[i])

    def mean_tokens(self) -> float:
        return float(self.length.mean()) if len(self) else 0.0

    def n_tokens(self) -> int:
        return int(self.length.sum())

    def max_tokens(self) -> int:
        return int(self.length.max()) if len(self) else 0

    def materialize(self, doc: int, start: int, end: int):
        tokens, labels = self.documents.tokens(doc)
        return tokens[start:end], labels[start:end], [doc]

    def doc_id(self, doc: int) -> str:
        return self.corpus.doc_ids[doc]


class Packer:
    """Fills rows of seq_len tokens from a MixtureSampler's units (see the module docstring).

    A row is a list of segments (source index, doc, start, end). The packer works on lengths
    only; `materialize_rows` turns rows into tensors, so a rank can plan the global batch and
    build just its own rows."""

    def __init__(self, units: list, sampler, seq_len: int, max_images: int):
        self.units, self.sampler = units, sampler
        self.seq_len, self.max_images = int(seq_len), int(max_images)
        for s, u in enumerate(units):
            if u.atomic and sampler.probs[s] > 0:
                if self.max_images < u.images_per_unit:
                    raise ValueError(f"max_images_per_sequence={max_images} leaves no room for {u.name} images")
                if u.max_tokens() > self.seq_len:
                    raise ValueError(f"{u.name} documents of {u.max_tokens()} tokens do not fit seq_len={seq_len}")
        self.carry: list[int] | None = None  # [source, doc, start, end]
        self.deferred: list[list[int]] = []
        self.rows = 0

    def next_row(self) -> list[tuple[int, int, int, int]]:
        T, row, used, images = self.seq_len, [], 0, 0
        keep = []
        for seg in self.deferred:
            s, doc, a, b = seg
            n_img = self.units[s].images_per_unit
            if used + b - a <= T and images + n_img <= self.max_images:
                row.append(tuple(seg))
                used, images = used + b - a, images + n_img
            else:
                keep.append(seg)
        self.deferred = keep
        if self.carry is not None:
            s, doc, a, b = self.carry
            take = min(b - a, T - used)
            if take > 0:
                row.append((s, doc, a, a + take))
                used += take
            self.carry = None if a + take == b else [s, doc, a + take, b]
        while used < T and self.carry is None:
            if len(self.deferred) >= max(self.max_images, 1):
                break  # a full row of images is waiting: pad this one
            s, i = self.sampler.next()
            u = self.units[s]
            doc, a, b = u.unit(i)
            if u.atomic:
                if used + b - a <= T and images + u.images_per_unit <= self.max_images:
                    row.append((s, doc, a, b))
                    used, images = used + b - a, images + u.images_per_unit
                else:
                    self.deferred.append([s, doc, a, b])
            else:
                take = min(b - a, T - used)
                row.append((s, doc, a, a + take))
                used += take
                if a + take < b:
                    self.carry = [s, doc, a + take, b]
        self.rows += 1
        return row

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "carry": None if self.carry is None else list(self.carry),
                "deferred": [list(d) for d in self.deferred], "rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.carry = None if state["carry"] is None else [int(x) for x in state["carry"]]
        self.deferred = [[int(x) for x in d] for d in state["deferred"]]
        self.rows = int(state["rows"])


def materialize_rows(units: list, rows: list, seq_len: int, pad_id: int, tiles=None) -> Batch:
    """Tensors for planned rows. tiles(source index, doc indices) -> uint8 [n, S, S] grey tiles."""
    import torch

    from herd.data.images import normalize_tiles

    B = len(rows)
    ids = np.full((B, seq_len), pad_id, dtype=np.int64)
    labels = np.full((B, seq_len), IGNORE_INDEX, dtype=np.int64)
    image_refs: list[tuple[int, int]] = []
    segments = []
    for r, row in enumerate(rows):
        pos, segs = 0, []
        for s, doc, a, b in row:
            u = units[s]
            tok, lab, imgs = u.materialize(doc, a, b)
            ids[r, pos : pos + len(tok)] = tok
            labels[r, pos : pos + len(tok)] = lab
            image_refs += [(s, d) for d in imgs]
            segs.append((u.name, u.doc_id(doc), a, b))
            pos += len(tok)
        segments.append(segs)
    pixel_values = None
    if image_refs:
        if tiles is None:
            raise ValueError("rows hold images but no tile reader was given")
        chunks = [tiles(s, [d]) for s, d in image_refs]
        pixel_values = normalize_tiles(np.concatenate(chunks))
    return Batch(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels), pixel_values=pixel_values,
                 n_tokens=int((labels != IGNORE_INDEX).sum()), n_images=len(image_refs), segments=segments)
