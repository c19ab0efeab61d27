"""Supervised fine-tuning on chat data: `herd sft --init DIR --data train.jsonl --out DIR`.

A stage of the shared loop (herd.train.loop) starting from a previous stage's model directory.

Loss mask. A dialog is encoded message by message in the Llama 4 chat format (herd.chat), and a
token is a *loss token* only if it belongs to an assistant message after its header: the reply
text, its tool calls, and the closing <|eot|> / <|eom|> — so the model learns to stop. The BOS,
system, user and tool (ipython) messages and every header are masked (label -100). No chat
template tags are needed: the mask comes from the message structure.

    <|begin_of_text|><|header_start|>user<|header_end|>\\n\\n 4 - 1 = <|eot|>
    <|header_start|>assistant<|header_end|>\\n\\n 3 <|eot|>
                                                  ^^^^^^^^^ loss (labels are next-token: label[t] = id[t+1])

Packing. Examples are packed greedily, in a seeded shuffled order per epoch, into rows of
`seq_len` tokens (padding the rest). Each example gets its own document id and positions that
restart at 0, so attention never crosses examples and every example sees exactly the positions
it would see alone (tests/train/test_sft.py checks packed logits against single-example logits).
Images (1–5 per turn, data URLs or paths relative to the JSONL file) become their tiles, in
the order their <|patch|> runs appear in the row-major batch.

Resume. The batch source's position (epoch, cursor) is saved in every checkpoint; the order of
epoch e is a function of (seed, e), so a resumed run sees the same rows.

Pruning (`--prune 0.5`, herd.train.prune): before training, the model being tuned scores every
example (pass@k on verifiable items, mean reference-answer loss otherwise) and the easiest
fraction is dropped; kept/dropped ids and a histogram land in OUT/prune/.

Bad input (unknown role, missing field, missing or undecodable image, too long): one ValueError
naming file:line and the problem; with `--skip-bad` those lines are counted, skipped and summed up.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from herd.train import distributed
from herd.train.loop import LoopConfig, build_optimizer, init_from, run, validation_loss

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool", "ipython")


@dataclass
class SFTConfig(LoopConfig):
    """SFT: the loop's settings plus data, packing and pruning (defaults: a short tiny-model run)."""

    init: str = field(default="", metadata={"help": "model directory to start from (a previous stage's --out)"})
    data: str = field(default="", metadata={"help": "messages JSONL (herd data sft writes DIR/train.jsonl)"})
    val_data: str | None = field(default=None, metadata={"help": "messages JSONL for validation loss (default: "
                                                                  "val.jsonl next to --data, if present)"})
    out: str = field(default="runs/sft", metadata={"help": "run directory"})
    max_steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "global batch, in packed rows"})
    seq_len: int = field(default=256, metadata={"help": "tokens per packed row (and the longest example)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    warmup: int = field(default=10, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (TRL's default 0)"})
    metap: bool = field(default=False, metadata={"help": "MetaP learning-rate multipliers (off: one rate)"})
    prune: float = field(default=0.5, metadata={"help": "drop this easiest fraction of the data before training "
                                                        "(0: keep all; 0.95: the Behemoth setting)"})
    prune_mode: str = field(default="model", metadata={"help": "model: by the model's difficulty scores; random: "
                                                               "a random subset of the same size (ablation)"})
    prune_scores: str | None = field(default=None, metadata={
        "help": "reuse difficulty scores from an earlier run's prune/scores.jsonl (same data) instead of scoring"})
    prune_k: int = field(default=4, metadata={"help": "samples per verifiable item for pass@k scoring"})
    prune_max_new: int = field(default=24, metadata={"help": "tokens generated per sample when scoring"})
    skip_bad: bool = field(default=False, metadata={"help": "skip (and count) bad JSONL lines instead of failing"})
    eval_batches: int = field(default=4, metadata={"help": "validation batches per evaluation"})
    eval_every: int = field(default=50, metadata={"help": "evaluate every N steps"})
    log_every: int = field(default=5, metadata={"help": "write a metrics.jsonl row every N steps"})

    def validate(self) -> None:
        super().validate()
        if not self.init or not self.data:
            raise ValueError("--init DIR and --data FILE are required")
        if self.batch_size <= 0 or self.seq_len <= 0:
            raise ValueError("--batch-size and --seq-len must be positive")
        if not 0.0 <= self.prune < 1.0:
            raise ValueError(f"--prune must be in [0, 1), got {self.prune}")
        if self.prune_mode not in ("model", "random"):
            raise ValueError(f"--prune-mode must be model or random, got {self.prune_mode!r}")


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


def _resolve_images(messages: list[dict], base: Path) -> list[dict]:
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
            msgs = _resolve_images(row["messages"], base)
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


# ----- the objective -------------------------------------------------------------------------------
class MaskedNextTokenLoss:
    """SFT's objective: summed next-token cross-entropy on assistant tokens only, each packed
    example attending only to itself at its own positions.

    vision_keepalive (model config, set under torchrun): a batch without images gets one extra
    padding row holding one blank tile's <|patch|> tokens (no labels, its own document), so every
    rank runs the vision tower and FSDP's gradient reduction has the same tensors on all ranks."""

    def __init__(self, device: torch.device, vision_keepalive=None):
        self.device, self.keepalive = device, vision_keepalive

    def tokens(self, batch: PackedBatch) -> int:
        return int((batch.labels != IGNORE).sum())

    def __call__(self, model, batch: PackedBatch):
        d = self.device
        ids, labels, pos, docs = batch.input_ids, batch.labels, batch.position_ids, batch.document_ids
        px = batch.pixel_values
        if px is None and self.keepalive is not None:
            ids, labels, pos, docs, px = _with_blank_image(batch, self.keepalive)
        px = None if px is None else px.to(d)
        loss = model(ids.to(d), pixel_values=px, position_ids=pos.to(d), document_ids=docs.to(d), labels=labels.to(d))
        return loss, self.tokens(batch), {}


def _with_blank_image(batch: PackedBatch, config):
    """The batch plus one unlabelled row carrying a blank tile ([B+1, T] tensors, [1, 3, S, S] pixels)."""
    B, T = batch.input_ids.shape
    n = config.vision.tokens_per_tile
    row = torch.full((1, T), int(batch.input_ids[0, -1]), dtype=torch.long)
    row[0, :n] = config.image_token_index
    ids = torch.cat([batch.input_ids, row])
    labels = torch.cat([batch.labels, torch.full((1, T), IGNORE, dtype=torch.long)])
    pos = torch.cat([batch.position_ids, torch.arange(T)[None]])
    docs = torch.cat([batch.document_ids, torch.zeros((1, T), dtype=torch.long)])
    S = config.vision.image_size
    return ids, labels, pos, docs, torch.zeros((1, 3, S, S))


# ----- the stage -----------------------------------------------------------------------------------
def sft(cfg: SFTConfig) -> dict:
    """Run (or resume) an SFT run. Returns the summary (also OUT/summary.json)."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = distributed.setup()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = init_from(cfg.init, env.device)
    vision = model.config.vision
    pad = tokenizer.special_tokens.get("<|finetune_right_pad|>", tokenizer.special_tokens["<|eot|>"])
    bad = BadLines(cfg.skip_bad)
    examples = load_examples(cfg.data, tokenizer, vision, cfg.seq_len, bad)
    if cfg.val_data and not Path(cfg.val_data).exists():
        raise ValueError(f"--val-data {cfg.val_data}: no such file")
    val_path = cfg.val_data or (Path(cfg.data).parent / "val.jsonl")
    val_examples = load_examples(val_path, tokenizer, vision, cfg.seq_len, bad) if Path(val_path).exists() else []
    if cfg.skip_bad and env.is_main:
        print(bad.summary())
    summary = {"examples": len(examples), "bad_lines": len(bad.messages)}
    if cfg.prune > 0:
        from herd.train.prune import prune_examples

        examples, report = prune_examples(model, tokenizer, examples, cfg, out / "prune", env)
        summary.update(report)
    torch.manual_seed(cfg.seed)
    source = PackedChat(examples, cfg.batch_size, cfg.seq_len, pad, cfg.seed, env.rank, env.world)
    model, optimizer = build_optimizer(model, cfg, env, verbose=False)
    config = distributed.unwrap(model).config
    keepalive = config if env.distributed and config.vision is not None else None
    objective = MaskedNextTokenLoss(env.device, keepalive)
    val = fixed_batches(val_examples, cfg.batch_size, cfg.seq_len, pad, cfg.eval_batches, env.rank, env.world)
    evals = [validation_loss(objective, val, env, cfg)] if val else []

    def plot(metrics_path, png):
        from herd.train.trainer import plot_curves

        plot_curves(metrics_path, png, None, f"SFT from {cfg.init}: {cfg.max_steps} steps")

    result = run(cfg, model, optimizer, objective, source, env, tokenizer=tokenizer, evals=evals, name="sft",
                 plot=plot, summary=summary)
    distributed.teardown(env)
    return result
