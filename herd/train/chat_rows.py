"""Chat rows for training: read messages JSONL, tokenize a dialog with its loss mask, pack rows.

Shared by SFT (herd.train.sft), pruning (herd.train.prune) and DPO (herd.train.dpo).

  * reading: `read_jsonl(path, check, bad)` gives each row `_where` = "file:line"; a bad line raises
    one ValueError naming file:line and the problem, or with `BadLines(skip=True)` is counted;
  * tokenizing: `encode_dialog` encodes message by message in the Llama 4 chat format (herd.chat),
    so the loss mask is the assistant messages after their headers, end-of-turn included;
  * packing: examples go greedily into rows of seq_len tokens; each has its own document id and
    positions from 0 (the model's document masking keeps them apart); `PackedChat` is the
    resumable batch source (epoch order seeded by (seed, epoch)).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool", "ipython")


# ----- reading -------------------------------------------------------------------------------------
class BadLines:
    """Collects bad-line messages when skipping; raises at once otherwise."""

    def __init__(self, skip: bool):
        self.skip, self.messages = skip, []

    def __call__(self, message: str) -> None:
        if not self.skip:
            raise ValueError(message)
        self.messages.append(message)

    def summary(self) -> str:
        return f"skipped {len(self.messages)} bad line(s)" + (f"; first: {self.messages[0]}" if self.messages else "")


def read_jsonl(path: str | Path, check, bad: BadLines) -> list[dict]:
    """Rows of a JSONL file, each passed through check(row) (raises ValueError with the problem);
    rows get `_where` = "file:line" for later messages."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("expected a JSON object")
                check(row)
            except json.JSONDecodeError as e:
                bad(f"{where}: not JSON ({e.msg})")
                continue
            except ValueError as e:
                bad(f"{where}: {e}")
                continue
            row["_where"] = where
            rows.append(row)
    return rows


def check_messages(messages) -> None:
    """Structure of an OpenAI/TRL `messages` list (ValueError naming the problem)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {j} is not an object")
        if "role" not in m:
            raise ValueError(f"message {j} has no 'role'")
        if m["role"] not in ROLES:
            raise ValueError(f"message {j} has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if "content" not in m and not m.get("tool_calls"):
            raise ValueError(f"message {j} ({m['role']}) has no 'content'")


def check_sft_row(row: dict) -> None:
    if "messages" not in row:
        raise ValueError("missing field 'messages'")
    check_messages(row["messages"])
    if not any(m["role"] == "assistant" for m in row["messages"]):
        raise ValueError("no assistant message: nothing to train on")


def resolve_images(messages: list[dict], base: Path) -> list[dict]:
    """Copy of messages with relative image paths made absolute (relative to the JSONL file) and
    a clear error for an image file that does not exist."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image" and isinstance(part.get("image"), str) \
                        and not part["image"].startswith("data:"):
                    p = Path(part["image"])
                    p = p if p.is_absolute() else base / p
                    if not p.exists():
                        raise ValueError(f"image {part['image']!r} does not exist")
                    part = {**part, "image": str(p)}
                parts.append(part)
            m = {**m, "content": parts}
        out.append(m)
    return out


# ----- tokenizing ----------------------------------------------------------------------------------
@dataclass
class Example:
    """One tokenized dialog: ids [n], loss mask [n] (True on assistant tokens after their header,
    end-of-turn included), image tiles in order (each [n_tiles, 3, S, S] float32)."""

    id: str
    ids: list
    mask: list
    tiles: list
    row: dict = dataclasses.field(repr=False, default_factory=dict)


def encode_dialog(tokenizer, messages: list[dict], vision_config=None) -> tuple[list[int], list[bool], list]:
    """(ids, loss mask, tiles) of a dialog, message by message (the chat format is a plain
    concatenation: BOS + each message), so each token knows the message it came from."""
    from herd.chat import encode_messages, header_tokens

    bos = tokenizer.special_tokens["<|begin_of_text|>"]
    head = len(header_tokens(tokenizer, "assistant"))
    ids, mask, tiles = [bos], [False], []
    for m in messages:
        mids, mtiles = encode_messages(tokenizer, [m], add_generation_prompt=False, vision_config=vision_config)
        mids = mids[1:]  # drop the BOS encode_messages starts with
        ids += mids
        if m["role"] == "assistant":
            mask += [False] * head + [True] * (len(mids) - head)
        else:
            mask += [False] * len(mids)
        tiles += mtiles
    return ids, mask, tiles


def tokenize_rows(rows: list[dict], tokenizer, vision_config, max_len: int, bad: BadLines,
                  image_token_index: int | None = None) -> list[Example]:
    out = []
    for row in rows:
        where = row.get("_where", "?")
        try:
            base = Path(where.rsplit(":", 1)[0]).parent
            msgs = resolve_images(row["messages"], base)
            ids, mask, tiles = encode_dialog(tokenizer, msgs, vision_config)
        except ValueError as e:
            bad(f"{where}: {e}")
            continue
        except Exception as e:  # noqa: BLE001 — an undecodable image raises PIL's own errors
            bad(f"{where}: could not encode ({type(e).__name__}: {e})")
            continue
        if tiles and vision_config is None:
            bad(f"{where}: has images but the model has no vision tower")
            continue
        if len(ids) > max_len:
            bad(f"{where}: {len(ids)} tokens, longer than --seq-len {max_len}")
            continue
        out.append(Example(str(row.get("id", where)), ids, mask, tiles, row))
    return out


def load_examples(path, tokenizer, vision_config, max_len: int, bad: BadLines) -> list[Example]:
    """Read, check and tokenize a messages JSONL file."""
    return tokenize_rows(read_jsonl(path, check_sft_row, bad), tokenizer, vision_config, max_len, bad)


# ----- packing -------------------------------------------------------------------------------------
@dataclass
class PackedBatch:
    """input_ids, labels, document_ids, position_ids [B, T]; pixel_values [n_tiles, 3, S, S] or None."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    document_ids: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    example_ids: list


def group_rows(examples: list[Example], seq_len: int) -> list[list[Example]]:
    """Greedy packing in order: a row takes examples while they fit in seq_len tokens."""
    rows, cur, used = [], [], 0
    for ex in examples:
        if cur and used + len(ex.ids) > seq_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(ex)
        used += len(ex.ids)
    return rows + ([cur] if cur else [])


def pack_rows(examples: list[Example], seq_len: int, pad_id: int) -> PackedBatch:
    """Pack examples (in order) into as few rows as needed; each example: its own document id,
    positions from 0, labels label[t] = id[t+1] where the next token is a loss token."""
    return _materialize(group_rows(examples, seq_len), seq_len, pad_id)


def _materialize(rows: list[list[Example]], seq_len: int, pad_id: int) -> PackedBatch:
    B = len(rows)
    ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    docs = torch.zeros((B, seq_len), dtype=torch.long)  # 0: padding (attends only to padding)
    pos = torch.zeros((B, seq_len), dtype=torch.long)
    tiles, names = [], []
    for b, row in enumerate(rows):
        t = 0
        for d, ex in enumerate(row, 1):
            n = len(ex.ids)
            x = torch.tensor(ex.ids)
            ids[b, t:t + n] = x
            m = torch.tensor(ex.mask[1:] + [False])  # label at t is id[t+1]: its mask
            lab = torch.cat([x[1:], torch.tensor([IGNORE])])
            labels[b, t:t + n] = torch.where(m, lab, torch.full_like(lab, IGNORE))
            docs[b, t:t + n] = d
            pos[b, t:t + n] = torch.arange(n)
            tiles += ex.tiles
            names.append(ex.id)
            t += n
        pos[b, t:] = torch.arange(seq_len - t)
    px = torch.cat(tiles) if tiles else None
    return PackedBatch(ids, labels, docs, pos, px, names)


class PackedChat:
    """Batch source (herd.train.loop.BatchSource): endless epochs over the examples, each in a
    shuffled order seeded by (seed, epoch), packed greedily into `batch_size` rows per batch; this
    rank takes its rows [rank·B/world, (rank+1)·B/world). State: (epoch, cursor)."""

    def __init__(self, examples: list[Example], batch_size: int, seq_len: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world: int = 1):
        if not examples:
            raise ValueError("no training examples left (all skipped or pruned?)")
        if batch_size % world:
            raise ValueError(f"global batch {batch_size} does not split over {world} ranks")
        self.examples, self.batch_size, self.seq_len, self.pad_id = examples, batch_size, seq_len, pad_id
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.cursor = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def __iter__(self):
        return self

    def _peek(self) -> Example:
        if self.cursor >= len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._perm(self.epoch)
        return self.examples[self._order[self.cursor]]

    def __next__(self) -> PackedBatch:
        rows = []
        for _ in range(self.batch_size):
            row, used = [], 0
            while not row or used + len(self._peek().ids) <= self.seq_len:
                ex = self._peek()
                row.append(ex)
                used += len(ex.ids)
                self.cursor += 1
            rows.append(row)
        per = self.batch_size // self.world
        return _materialize(rows[self.rank * per:(self.rank + 1) * per], self.seq_len, self.pad_id)

    @property
    def epochs(self) -> float:
        return self.epoch + self.cursor / len(self._order)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": len(self.examples), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != len(self.examples) or state["seed"] != self.seed:
            raise ValueError(f"checkpoint data position is for {state['n']} examples / seed {state['seed']}, "
                             f"this run has {len(self.examples)} / {self.seed}: not the same data")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._perm(self.epoch)


def fixed_batches(examples: list[Example], batch_size: int, seq_len: int, pad_id: int, limit: int,
                  rank: int = 0, world: int = 1) -> list[PackedBatch]:
    """Validation batches: examples in file order, packed, the first `limit` full batches (this rank's rows)."""
    rows = group_rows(examples, seq_len)
    per = batch_size // world
    out = []
    for i in range(0, len(rows) - batch_size + 1, batch_size):
        if len(out) >= limit:
            break
        out.append(_materialize(rows[i + rank * per:i + (rank + 1) * per], seq_len, pad_id))
    if not out and len(rows) >= world:  # fewer rows than one batch: one smaller batch
        per = len(rows) // world
        out.append(_materialize(rows[rank * per:(rank + 1) * per], seq_len, pad_id))
    return out
