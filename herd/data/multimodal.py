"""Multimodal documents: a digit image placed inside text with Llama 4's image token layout.

A digit document (what the packer places, never cut by a sequence boundary):

    <|begin_of_text|> <|image_start|> <|image|> <|patch|>×n <|image_end|> This is a handwritten digit 7. <|end_of_text|>

The image placeholder is `herd.chat.image_tokens`, the layout the chat format and inference
use (a multi-tile image would add tile separators; digits are one tile whenever the tile is at
least 28 pixels). n = tokens_per_tile of the vision config (4 for the tiny preset). The model
replaces the <|patch|> embeddings with the projected vision features of the tile (early fusion),
so the caption tokens learn to name the digit from the pixels.

Labels: no loss where the target is an image-layout token (the model cannot predict pixels,
nor should it learn to emit images), nor after <|end_of_text|>.

`digit_eval_set` gives the matching evaluation: held-out images, the prompt up to the digit
("... This is a handwritten digit "), and the 10 candidate answer tokens "0".."9".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from herd.data.types import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

CAPTION_TEMPLATE = "This is a handwritten digit {digit}."
PROMPT_TEXT = "This is a handwritten digit "
IMAGE_LAYOUT_TOKENS = ("<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
                       "<|tile_x_separator|>", "<|tile_y_separator|>")


def _special(tokenizer, name: str) -> int:
    try:
        return tokenizer.special_tokens[name]
    except KeyError:
        raise ValueError(f"the tokenizer has no special token {name}; image documents need it") from None


def image_layout_ids(tokenizer) -> np.ndarray:
    """Ids of the image-layout special tokens the tokenizer has (never loss targets)."""
    return np.array(sorted(tokenizer.special_tokens[n] for n in IMAGE_LAYOUT_TOKENS if n in tokenizer.special_tokens),
                    dtype=np.int64)


def shifted_labels(tokens: np.ndarray, no_loss_ids: np.ndarray, eos_id: int | None = None) -> np.ndarray:
    """labels[t] = tokens[t + 1], IGNORE_INDEX for the last position and where the target is in
    no_loss_ids (and, if eos_id is given, after an end-of-text token)."""
    labels = np.full(len(tokens), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = tokens[1:]
    labels[np.isin(labels, no_loss_ids)] = IGNORE_INDEX
    if eos_id is not None:
        labels[tokens == eos_id] = IGNORE_INDEX
    return labels


class DigitDocuments:
    """Token ids and labels of the digit documents of one DigitCorpus."""

    def __init__(self, tokenizer, corpus, vision_config, image_token_index: int | None = None):
        from herd.chat import image_tokens
        from herd.image import VisionSettings

        self.corpus = corpus
        self.settings = VisionSettings.from_config(vision_config)
        self.patch_id = _special(tokenizer, "<|patch|>")
        if image_token_index is not None and int(image_token_index) != self.patch_id:
            raise ValueError(f"the model's image_token_index {image_token_index} is not the tokenizer's "
                             f"<|patch|> id {self.patch_id}: tokenizer and model config do not match")
        self.bos_id = _special(tokenizer, "<|begin_of_text|>")
        self.eos_id = _special(tokenizer, "<|end_of_text|>")
        self.placeholder = np.array(image_tokens(tokenizer, corpus.grid, self.settings.tokens_per_tile), dtype=np.int64)
        self.patches_per_image = int((self.placeholder == self.patch_id).sum())
        if self.patches_per_image != corpus.tiles_per_image * self.settings.tokens_per_tile:
            raise ValueError(f"{self.patches_per_image} <|patch|> tokens for {corpus.tiles_per_image} tiles of "
                             f"{self.settings.tokens_per_tile} tokens")
        self.captions = [np.array(tokenizer.encode(CAPTION_TEMPLATE.format(digit=d)), dtype=np.int64)
                         for d in range(10)]
        self.no_loss = image_layout_ids(tokenizer)
        self._docs = [np.concatenate([[self.bos_id], self.placeholder, cap, [self.eos_id]]) for cap in self.captions]
        self._labels = [shifted_labels(d, self.no_loss, self.eos_id) for d in self._docs]

    def length(self, i: int) -> int:
        return len(self._docs[int(self.corpus.labels[i])])

    def lengths(self, idx: np.ndarray) -> np.ndarray:
        by_digit = np.array([len(d) for d in self._docs], dtype=np.int64)
        return by_digit[self.corpus.labels[idx]]

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, labels) of image document i."""
        d = int(self.corpus.labels[i])
        return self._docs[d], self._labels[d]


# ----------------------------------------------------------------------------- evaluation


@dataclass
class DigitEvalSet:
    """Image prompts and the 10 candidate answers: accuracy = argmax over the digit tokens."""

    input_ids: "torch.Tensor"  # [N, L] long: BOS, image placeholder, "This is a handwritten digit "
    pixel_values: "torch.Tensor"  # [N * tiles_per_image, 3, S, S]
    targets: "torch.Tensor"  # [N] long, the digit shown
    candidate_ids: "torch.Tensor"  # [10] long: token id of "0".."9"
    doc_ids: list[str]
    tiles_per_image: int = 1

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def batches(self, batch_size: int = 64):
        """Yield (input_ids [b, L], pixel_values [b * tiles, 3, S, S], targets [b])."""
        t = self.tiles_per_image
        for i in range(0, len(self), batch_size):
            j = min(i + batch_size, len(self))
            yield self.input_ids[i:j], self.pixel_values[i * t : j * t], self.targets[i:j]

    def predictions(self, logits) -> "torch.Tensor":
        """Predicted digits from logits [n, V] (last prompt position) or [n, L, V]."""
        if logits.dim() == 3:
            logits = logits[:, -1]
        return logits[:, self.candidate_ids.to(logits.device)].argmax(dim=-1).cpu()

    def accuracy(self, logits, targets=None) -> float:
        targets = self.targets if targets is None else targets
        return float((self.predictions(logits) == targets.cpu()).float().mean())


def digit_eval_set(tokenizer, vision_config, data_config=None, split: str = "val",
                   limit: int | None = None) -> DigitEvalSet:
    """The digit images of `split` ("val" or "train", as build_datasets splits them) as prompts.

    Every prompt is [BOS] + image placeholder + PROMPT_TEXT; the answer is one of the 10
    candidate tokens. Raises ValueError if the tokenizer would not split the training caption
    as prompt + digit token (then the evaluation would not match training)."""
    import torch

    from herd.data.cache import digit_corpus
    from herd.data.images import DIGIT_SOURCES, normalize_tiles
    from herd.data.types import DataConfig
    from herd.data.splits import validation_mask
    from herd.tokenizer import load_tokenizer

    if split not in ("val", "train"):
        raise ValueError(f"split must be 'val' or 'train', got {split!r}")
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    cfg = data_config or DataConfig()
    corpus = digit_corpus(vision_config, cfg.cache_dir, limit=cfg.max_docs, which=cfg.digit_sources or DIGIT_SOURCES)
    docs = DigitDocuments(tok, corpus, vision_config)
    prompt = np.concatenate([[docs.bos_id], docs.placeholder, tok.encode(PROMPT_TEXT)]).astype(np.int64)
    cands = []
    for d in range(10):
        ids = tok.encode(str(d))
        if len(ids) != 1:
            raise ValueError(f"digit {d} is {len(ids)} tokens for this tokenizer; the digit evaluation needs one")
        cands.append(ids[0])
        n_text = len(prompt) - 1 - len(docs.placeholder)
        caption = docs.captions[d]
        if list(caption[: n_text + 1]) != list(prompt[1 + len(docs.placeholder):]) + [ids[0]]:
            raise ValueError(f"the tokenizer splits {CAPTION_TEMPLATE.format(digit=d)!r} differently from "
                             f"{PROMPT_TEXT!r} + {d!r}: the digit evaluation would not match training")
    mask = validation_mask(corpus.split_keys, cfg.val_fraction)
    idx = np.flatnonzero(mask if split == "val" else ~mask)
    if limit is not None and limit < len(idx):  # evenly spaced: every source and class, not the first ones
        idx = idx[np.linspace(0, len(idx) - 1, limit).round().astype(np.int64)]
    if len(idx) == 0:
        raise ValueError(f"no digit images in the {split} split")
    tiles = np.asarray(corpus.tiles[idx])  # [n, tiles, S, S]
    return DigitEvalSet(
        input_ids=torch.from_numpy(np.tile(prompt, (len(idx), 1))),
        pixel_values=normalize_tiles(tiles.reshape(-1, *tiles.shape[2:])),
        targets=torch.from_numpy(corpus.labels[idx].astype(np.int64)),
        candidate_ids=torch.tensor(cands, dtype=torch.long),
        doc_ids=[corpus.doc_ids[i] for i in idx],
        tiles_per_image=corpus.tiles_per_image,
    )
