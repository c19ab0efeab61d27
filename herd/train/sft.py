"""Supervised fine-tuning on chat data: `herd sft --init DIR --data train.jsonl --out DIR`.

A stage of the shared loop (herd.train.loop) starting from a previous stage's model directory;
reading, tokenizing and packing the chat rows live in herd.train.chat_rows.

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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from herd.model.loss import linear_cross_entropy
from herd.train import distributed
from herd.train.chat_rows import IGNORE, BadLines, PackedBatch, PackedChat, fixed_batches, load_examples
from herd.train.loop import LoopConfig, build_optimizer, init_from, run, validation_loss


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
    prune_mode: Literal["model", "random"] = field(default="model", metadata={
        "help": "model: by the model's difficulty scores; random: a random subset of the same size (ablation)"})
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


# ----- the objective -------------------------------------------------------------------------------
class MaskedNextTokenLoss:
    """SFT's objective: summed next-token cross-entropy on assistant tokens only, each packed
    example attending only to itself at its own positions. Only the loss tokens' hidden states go
    through the LM head (herd.model.loss's fused chunked head + cross-entropy): prompts, headers
    and padding are most of a chat row, and the [n, vocab] head was ~30% of an fp32 step on all
    tokens (profile: `python benchmarks/posttrain_vs_trl.py --profile`).

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
        labels = labels.to(d)
        keep = labels != IGNORE  # [B, T]: the assistant tokens, a fraction of the packed row

        def head(h, weight):  # h [B, T, H] → only the loss tokens' hidden states [n, H] meet the LM head
            return linear_cross_entropy(h[keep], weight, labels[keep])

        loss = model(ids.to(d), pixel_values=px, position_ids=pos.to(d), document_ids=docs.to(d), apply_head=head)
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
