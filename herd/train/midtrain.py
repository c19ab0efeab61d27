"""Long-context mid-training: continue a pre-trained run on long synthetic documents mixed with
the original pre-training data, through a sequence-length curriculum.

    herd midtrain --init runs/tiny --out runs/tiny-long --curriculum 512:0.5,2048:0.3,8192:0.2 \\
        --long-ratio 0.5 --max-steps 60 [--resume] [--teacher DIR [--distill-weight gap] ...]

Idea (Llama 4 model card and blog: "mid-training with specialized datasets ... extending context
length"; ProLong, Gao et al. 2024): after pre-training at a short length, keep training the same
model (same loss, same loop) on longer rows. Three lessons from ProLong shape the defaults:
  * long data alone makes a model forget short-context skills, so each batch is either long
    synthetic documents (probability `long_ratio`) or the original pre-training mixture packed
    at the current length (herd.data: the same sources, splits and packing as pre-training);
  * lengths grow by stages (`curriculum`, LENGTH:FRACTION_OF_STEPS), each stage one `Phase` of
    the shared loop with its own batch source, and the tokens per micro-batch stay constant
    (`batch_tokens`: rows = batch_tokens // length);
  * it is judged by short-context quality too: every evaluation logs the validation loss at the
    *original* length (`short_val_loss`, the pre-training run's seq_len) and its relative change
    from the starting checkpoint; a rise above `short_val_tolerance` (2%) prints a warning and
    logs `short_val_regressed: 1`.

Long documents are herd.data.longctx samples (needles, variable tracking, multi-hop lookup,
"which file defines X", ...) with their answer appended, trained with the ordinary next-token
loss: `<|begin_of_text|> input answer_prefix answer <|end_of_text|>` padded to the row length
(padding carries no loss). A sample is a pure function of (seed, stage, batch, row), so the
source's state is two counters and the short stream's position: resume is exact.

Everything else (LR schedule with its own warm-up and peak, accumulation, clipping, MetaP groups,
MoE balancing, checkpoints, torchrun) is herd.train.loop's, shared with pre-training.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from herd.train.distill import DistillSettings, validate_settings
from herd.train.loop import LoopConfig, Phase, build_optimizer, init_from, run, validation_loss

DEFAULT_TASKS = "niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multivalue,vt,multihop,file_defines"
ANSWER_BUDGET = 64  # tokens reserved after the prompt for the answer and <|end_of_text|>


@dataclass
class MidtrainConfig(DistillSettings, LoopConfig):
    """Mid-training: the loop's settings plus where to start, the curriculum and the data mixture;
    with --teacher DIR, codistillation (herd.train.distill, online teacher) replaces the plain loss."""

    init: str = field(default="runs/tiny", metadata={"help": "pre-trained run directory to continue from"})
    out: str = field(default="runs/tiny-long", metadata={"help": "run directory"})
    curriculum: str = field(default="512:0.5,2048:0.3,8192:0.2", metadata={
        "help": "sequence-length stages LENGTH:FRACTION_OF_STEPS, in order"})
    long_ratio: float = field(default=0.5, metadata={
        "help": "probability that a micro-batch is long synthetic documents (else the pre-training mixture)"})
    tasks: str = field(default=DEFAULT_TASKS, metadata={"help": "synthetic task families (herd.data.longctx)"})
    batch_tokens: int = field(default=4096, metadata={"help": "tokens per micro-batch (rows = this // length)"})
    short_len: int | None = field(default=None, metadata={
        "help": "the original (short) length for short_val_loss (default: the init run's seq_len)"})
    short_val_tolerance: float = field(default=0.02, metadata={
        "help": "warn when short_val_loss rises more than this fraction above the starting checkpoint's"})
    eval_batches: int = field(default=4, metadata={"help": "validation batches at the short length"})
    max_steps: int = field(default=60, metadata={"help": "optimizer steps (the schedule spans them)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (its own schedule, not the init run's)"})
    warmup: int = field(default=5, metadata={"help": "linear warm-up steps"})
    eval_every: int = field(default=10, metadata={"help": "evaluate every N steps (and at the end)"})
    ckpt_every: int = field(default=20, metadata={"help": "checkpoint every N steps (and at the end)"})
    max_docs: int | None = field(default=None, metadata={"help": "per data source: only the first N documents"})
    data_cache: str | None = field(default=None, metadata={"help": "token cache directory"})
    mixture: dict | None = field(default=None, metadata={"cli": False})  # default: the init run's mixture

    def stages(self) -> list[tuple[int, int, int]]:
        """[(length, first step, stop step)] covering [0, max_steps)."""
        parts = parse_curriculum(self.curriculum)
        total = sum(f for _, f in parts)
        out, start = [], 0
        for i, (length, frac) in enumerate(parts):
            stop = self.max_steps if i == len(parts) - 1 else min(self.max_steps, start + round(self.max_steps * frac / total))
            if stop > start:
                out.append((length, start, stop))
            start = stop
        return out

    def validate(self) -> None:
        super().validate()
        validate_settings(self)
        parse_curriculum(self.curriculum)
        from herd.data.longctx import parse_tasks

        parse_tasks(self.tasks)
        if not 0 <= self.long_ratio <= 1:
            raise ValueError(f"--long-ratio must be in [0, 1], got {self.long_ratio}")
        if self.batch_tokens < 1:
            raise ValueError(f"--batch-tokens must be positive, got {self.batch_tokens}")


def parse_curriculum(text: str) -> list[tuple[int, float]]:
    """'512:0.5,2k:0.5' → [(512, 0.5), (2048, 0.5)]."""
    from herd.data.longctx import parse_lengths

    out = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        length, sep, frac = part.partition(":")
        try:
            f = float(frac) if sep else 1.0
        except ValueError:
            f = -1.0
        if f <= 0:
            raise ValueError(f"bad curriculum stage {part!r}: expected LENGTH:FRACTION with a positive fraction")
        out.append((parse_lengths(length)[0], f))
    if not out:
        raise ValueError("the curriculum has no stages")
    return out


# ----- data ---------------------------------------------------------------------------------------
SAMPLE_ATTEMPTS = 8  # draws per long row before a generator error is final


def long_document(tokenizer, sample: dict, length: int) -> list[int]:
    """`<bos> input answer_prefix answer <eos>` ids (≤ length + 1 after truncation)."""
    ids = tokenizer.encode(sample["input"] + sample["answer_prefix"], bos=True)
    answer = " " + ", ".join(sample["answers"]) + "."
    ids += tokenizer.encode(answer, eos=True)
    return ids[: length + 1]


class MixedSource:
    """Batches of one curriculum stage: long synthetic rows with probability `long_ratio`, else the
    pre-training stream at this length. Exact position: (batches drawn, the short stream's state)."""

    def __init__(self, tokenizer, length: int, rows: int, long_ratio: float, tasks: list[str], seed: int,
                 short_stream, pad_id: int, stage: str, rank: int = 0, world: int = 1):
        if rows % world:
            raise ValueError(f"{rows} rows per batch at length {length} do not split over {world} ranks; "
                             "change --batch-tokens")
        self.tok, self.length, self.rows, self.long_ratio = tokenizer, length, rows, long_ratio
        self.tasks, self.seed, self.short, self.pad_id, self.stage = tasks, seed, short_stream, pad_id, stage
        self.rank, self.world = rank, world  # this rank builds global rows rank, rank + world, ...
        self.batches = 0

    def __iter__(self):
        return self

    def __next__(self):
        from herd.data.longctx import DEPTHS_40, PROSE_SOURCES, TASKS, make_sample, rng_for

        b = self.batches
        rng = rng_for("midtrain", self.seed, self.stage, b)
        self.batches += 1
        if rng.random() >= self.long_ratio:
            return next(self.short)
        from herd.data.packing import Batch

        mine = range(self.rank, self.rows, self.world)
        ids = torch.full((len(mine), self.length + 1), self.pad_id, dtype=torch.long)
        labels = torch.full((len(mine), self.length), -100, dtype=torch.long)
        for k, r in enumerate(mine):
            row = rng_for("midtrain-row", self.seed, self.stage, b, r)  # same row on any world size
            task = row.choice(self.tasks)
            hay = row.choice(PROSE_SOURCES) if TASKS[task].haystack == "prose" else None
            budget = self.length + TASKS[task].tokens_to_generate - ANSWER_BUDGET
            depth = row.choice(DEPTHS_40)
            # Some draws have no valid sample at this length (file_defines: no name defined exactly once
            # in the files that fit); the template itself was checked at start-up, so draw again — from
            # the row's own generator, so the stream stays deterministic.
            for attempt in range(SAMPLE_ATTEMPTS):
                try:
                    s = make_sample(self.tok, task, budget, seed=self.seed, index=row.getrandbits(32),
                                    depth=depth, haystack=hay)
                    break
                except ValueError:
                    if attempt == SAMPLE_ATTEMPTS - 1:
                        raise
            doc = torch.tensor(long_document(self.tok, s, self.length))
            ids[k, : len(doc)] = doc
            labels[k, : len(doc) - 1] = doc[1:]
        return Batch(input_ids=ids[:, :-1].contiguous(), labels=labels, pixel_values=None,
                     n_tokens=int((labels != -100).sum()))

    def state_dict(self) -> dict:
        return {"batches": self.batches, "short": self.short.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])
        self.short.load_state_dict(state["short"])


def _init_settings(init: Path) -> dict:
    p = init / "train_config.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def short_regression_hook(base_hook, start: float, tolerance: float, is_main: bool):
    """Wraps the short-length validation hook: adds the change from the start and warns on a rise."""

    def hook(model) -> dict:
        v = base_hook(model)["short_val_loss"]
        rel = v / start - 1.0
        out = {"short_val_loss": v, "short_val_loss_change": rel, "short_val_regressed": float(rel > tolerance)}
        if rel > tolerance and is_main:
            print(f"warning: short-context validation loss {v:.4f} is {100 * rel:.1f}% above the starting "
                  f"checkpoint's {start:.4f} (tolerance {100 * tolerance:.0f}%): raise --long-ratio's complement "
                  "(more pre-training data) or lower --lr", file=sys.stderr)
        return out

    return hook


# ----- the stage ----------------------------------------------------------------------------------
def midtrain(cfg: MidtrainConfig) -> dict:
    """Run (or resume) mid-training. Returns the summary (also OUT/summary.json)."""
    cfg.validate()
    from herd.data import DataConfig, build_datasets
    from herd.data.longctx import TASKS, make_sample, parse_tasks
    from herd.train import distributed
    from herd.train.trainer import NextTokenLoss

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    init = Path(cfg.init)
    env = distributed.setup()
    torch.manual_seed(cfg.seed)
    model, tok = init_from(init, device=env.device)
    settings = _init_settings(init)
    short_len = cfg.short_len or int(settings.get("seq_len") or 256)
    stages = cfg.stages()
    longest = max(n for n, _, _ in stages)
    text = model.config.text
    if text.max_position_embeddings < longest:  # the run's config must serve what it trains on
        text.max_position_embeddings = longest
    mixture = dict(cfg.mixture or settings.get("mixture") or {}) or None

    def data(length: int, rows: int, val_batches: int = 1):
        kw = dict(seq_len=length, batch_size=rows, seed=cfg.seed, cache_dir=cfg.data_cache or settings.get("data_cache"),
                  val_batches=val_batches, max_docs=cfg.max_docs, progress=False)
        dc = DataConfig(**kw, **({"weights": mixture} if mixture else {}))
        if model.config.vision is None:
            dc.weights = {k: v for k, v in dc.weights.items() if k != "digits"}
        vis = model.config.vision
        return build_datasets(tok, dc, vision_config=vis, image_token_index=model.config.image_token_index if vis else None,
                              rank=env.rank, world_size=env.world)

    objective = NextTokenLoss(env.device, tok.bos_id)
    _, short_val = data(short_len, max(1, cfg.batch_tokens // short_len), cfg.eval_batches)
    short_hook = validation_loss(objective, short_val, env, cfg, key="short_val_loss")
    start = short_hook(model)["short_val_loss"]  # the starting checkpoint's (same value on resume)
    if env.is_main:
        print(f"mid-training from {init}: stages {', '.join(f'{n} tokens × {b - a} steps' for n, a, b in stages)}; "
              f"long ratio {cfg.long_ratio}; short_val_loss at {short_len} tokens starts at {start:.4f}")

    tasks = parse_tasks(cfg.tasks)
    shortest = min(n for n, _, _ in stages)
    for task in tasks:  # a template that does not fit the first stage fails now, not mid-run
        make_sample(tok, task, shortest + TASKS[task].tokens_to_generate - ANSWER_BUDGET, seed=cfg.seed)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    sources = []
    for length, a, b in stages:
        rows = max(1, cfg.batch_tokens // length)
        train_stream, _ = data(length, rows)
        sources.append(Phase(f"len{length}", MixedSource(tok, length, rows, cfg.long_ratio, tasks, cfg.seed,
                                                         train_stream, pad, f"len{length}", env.rank, env.world), a, b))
    model_config = model.config
    model, optimizer = build_optimizer(model, cfg, env, verbose=False)
    distill_objective = None
    if cfg.teacher:  # codistillation on the same batches (validation stays plain cross-entropy)
        from herd.train import distill

        distill_objective = distill.build_objective(cfg, model_config, tok, None, env)
    hook = short_regression_hook(short_hook, start, cfg.short_val_tolerance, env.is_main)
    last = sources[-1]
    summary = run(cfg, model, optimizer, distill_objective or objective, last.source, env, tokenizer=tok,
                  phases=sources[:-1], evals=[hook], name=last.name,
                  extra_state={"distill": distill_objective} if distill_objective else None,
                  summary={"init": str(init), "short_len": short_len, "short_val_loss_start": round(start, 5),
                           "curriculum_lengths": [n for n, _, _ in stages]})
    distributed.teardown(env)
    return summary


def add_midtrain_subcommand(subparsers) -> None:
    """Register `herd midtrain`."""
    import argparse

    from herd.train.flags import add_dataclass_arguments, config_from_args

    p = subparsers.add_parser("midtrain", help="long-context mid-training: length curriculum on synthetic + pre-training data",
                              description=__doc__.split("\n\n")[0] + " Writes the same run directory as herd train.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_arguments(p, MidtrainConfig)
    p.set_defaults(func=lambda args: 0 if midtrain(config_from_args(MidtrainConfig, args)) is not None else 1)
