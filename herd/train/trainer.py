"""Pre-training: `herd train --preset tiny --max-steps N --out DIR [--resume]`.

A stage of the shared loop (herd.train.loop): a model built from a preset with MetaP init, the
`NextTokenLoss` objective over packed text + image rows, the bundled data stream as the batch
source, validation loss and digit accuracy as evaluation hooks. One step = `grad_accum`
micro-batches → mean next-token loss over all loss tokens of the global batch → backward →
gradient clipping → AdamW (MetaP parameter groups) → MoE bias update.

Stages, as Meta describes the recipe:
  * vision alignment (`--align-steps N`, from step `--align-start S`): image-caption batches
    only; the language model is frozen (its gradients are dropped) while the vision tower and
    projector learn to speak its language. Meta aligns against a pre-trained language model, so
    a from-scratch run places this stage after S steps of joint pre-training. `--align-freeze none`
    trains the language model in this stage too: the tiny recipe (Makefile) keeps the vision side
    at its random init (`--vision-lr-mult 0`; trained from scratch it collapses every image onto one
    feature vector, BENCHMARKS.md issue 18) and uses the stage to teach the language model to read it;
  * joint training on the full text + image mixture, everything unfrozen, before and after.

Packed rows hold several documents; attention is masked so it never crosses from one into the
next (`--no-document-mask` to ablate), as Meta trains Llama 3 and 4.

Outputs in OUT/: metrics.jsonl (one JSON object per logged step: step, loss, lr, tokens_per_s,
grad_norm, expert-load statistics, val_loss / digit_acc at evaluations), loss.png, checkpoints/
(crash-safe, the newest `keep`), and the final model as a Hugging Face directory (config.json,
model.safetensors, tokenizer.json) that `herd.load_model(OUT)` and transformers read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from herd.train import distributed, metap
from herd.train.distill import DistillSettings, validate_settings
from herd.train.loop import LoopConfig, Phase, autocast, build_optimizer, run, validation_loss


@dataclass
class TrainConfig(DistillSettings, LoopConfig):
    """Pre-training: the loop's settings (herd.train.loop.LoopConfig), codistillation's
    (herd.train.distill.DistillSettings), plus model, data and stages. `herd train`'s flags are
    generated from these fields (herd.train.flags): the help lives here."""

    preset: str = field(default="tiny", metadata={"help": "model preset (tiny, small, ...)"})
    width: int | None = field(default=None, metadata={
        "help": "tiny recipe at this hidden size (multiple of 128; MetaP transfer experiments)"})
    layers: int | None = field(default=None, metadata={"help": "tiny recipe with this many layers"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (at MetaP's base width)"})
    batch_size: int = field(default=8, metadata={"help": "global batch in sequences (split across ranks)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per packed row"})
    document_mask: bool = field(default=True, metadata={
        "help": "attention stays inside each packed document (--no-document-mask, the ablation: let it cross "
                "the boundaries of packed documents)"})
    metap: bool = field(default=True, metadata={
        "help": "MetaP init and per-tensor learning rates (--no-metap, the ablation: standard init, std 0.02, "
                "and one learning rate for all parameters)"})
    fp8: Literal["tensorwise", "rowwise"] | None = field(default=None, metadata={
        "help": "FP8 matmuls (e4m3 forward, e5m2 gradients; emulated on CPU)"})
    align_steps: int = field(default=0, metadata={
        "help": "vision alignment stage: steps on image-caption data with the language model frozen"})
    align_start: int = field(default=0, metadata={
        "help": "step at which the alignment stage starts (after text pre-training, as Meta does)"})
    align_freeze: Literal["lm", "none"] = field(default="lm", metadata={
        "help": "what the alignment stage freezes: the language model (only vision + projector learn), "
                "or nothing"})
    eval_batches: int = field(default=8, metadata={"help": "validation batches per evaluation"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "directory with tokenizer.json (trained into --out if absent)"})
    mixture: dict | None = field(default=None, metadata={
        "help": "data mixture as token shares, e.g. shakespeare=0.3,python=0.4,digits=0.3; "
                "unset (None): herd.data.DEFAULT_WEIGHTS"})
    data_cache: str | None = field(default=None, metadata={
        "help": "tokenised-data cache directory (default OUT/data_cache)"})
    max_docs: int | None = field(default=None, metadata={
        "help": "use only the first N documents per data source (quick runs, tests)"})
    extra: dict = field(default_factory=dict)
    teacher_targets: str | None = field(default=None, metadata={
        "help": "offline teacher targets: a directory of top-K log-probs for this data stream, precomputed "
                "there (once) when absent"})

    def validate(self) -> None:
        if self.max_steps <= 0 or self.batch_size <= 0 or self.seq_len <= 0 or self.grad_accum <= 0:
            raise ValueError("max_steps, batch_size, seq_len and grad_accum must be positive")
        if self.fp8 not in (None, "tensorwise", "rowwise"):
            raise ValueError(f"--fp8 must be tensorwise or rowwise, got {self.fp8!r}")
        super().validate()
        validate_settings(self)
        if self.align_freeze not in ("lm", "none"):
            raise ValueError(f"--align-freeze must be lm or none, got {self.align_freeze!r}")
        if self.align_steps and self.align_start + self.align_steps >= self.max_steps:
            raise ValueError("the alignment stage (--align-start + --align-steps) must end before --max-steps")


# ----- pieces -------------------------------------------------------------------------------------
def prepare_tokenizer(cfg: TrainConfig, vocab_size: int, out: Path, env):
    """Use --tokenizer, or the run's own tokenizer.json, or train one on the bundled corpora."""
    from herd.tokenizer import load_tokenizer
    from herd.tokenizer_train import train_tokenizer

    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    elif (out / "tokenizer.json").exists():
        tok = load_tokenizer(out)
    else:
        if env.is_main:
            from herd.data import training_texts

            print(f"training a {vocab_size}-token byte-level BPE on the bundled corpora → {out}/tokenizer.json")
            train_tokenizer(training_texts(), vocab_size, out)
        distributed.barrier(env)
        tok = load_tokenizer(out)
    if tok.vocab_size != vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {vocab_size}")
    return tok


def data_config(cfg: TrainConfig, weights: dict | None = None):
    from herd.data import DataConfig

    dc = DataConfig(seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed, cache_dir=cfg.data_cache,
                    val_batches=cfg.eval_batches, max_docs=cfg.max_docs)
    if weights or cfg.mixture:
        dc = dataclasses.replace(dc, weights=dict(weights or cfg.mixture))
    return dc


def build_data(cfg: TrainConfig, tokenizer, model_config, env, weights: dict | None = None):
    """(train stream sharded for this rank, validation set sharded for this rank)."""
    from herd.data import build_datasets

    if cfg.batch_size % env.world:
        raise ValueError(f"global batch {cfg.batch_size} does not split over {env.world} ranks")
    dc = data_config(cfg, weights)
    if model_config.vision is None and "digits" in dc.weights:
        dc = dataclasses.replace(dc, weights={k: v for k, v in dc.weights.items() if k != "digits"})
    # rank 0 builds the token cache first; the others then read it
    if not env.is_main:
        distributed.barrier(env)
    train, val = build_datasets(tokenizer, dc, vision_config=model_config.vision,
                                image_token_index=model_config.image_token_index if model_config.vision else None,
                                rank=env.rank, world_size=env.world)
    if env.is_main:
        distributed.barrier(env)
    return train, val.shard(env.rank, env.world) if env.distributed else val


def document_ids(input_ids: torch.Tensor, bos_id: int | None) -> torch.Tensor | None:
    """[B, T] ids of the packed documents: every <|begin_of_text|> starts a new one."""
    if bos_id is None:
        return None
    return (input_ids == bos_id).cumsum(dim=-1)


class NextTokenLoss:
    """Pre-training's objective (herd.train.loop.Objective): summed next-token cross-entropy over
    every labelled position, attention masked to each packed document (a BOS starts one)."""

    def __init__(self, device: torch.device, bos_id: int | None, document_mask: bool = True):
        self.device, self.bos_id, self.document_mask = device, bos_id, document_mask

    def tokens(self, batch) -> int:
        return int((batch.labels != -100).sum())

    def __call__(self, model, batch):
        ids = batch.input_ids.to(self.device)  # [B, T]
        docs = document_ids(ids, self.bos_id) if self.document_mask else None
        px = None if batch.pixel_values is None else batch.pixel_values.to(self.device)  # [n_tiles, 3, S, S]
        loss = model(ids, pixel_values=px, document_ids=docs, labels=batch.labels.to(self.device))
        return loss, self.tokens(batch), {}


def plot_curves(metrics_path: Path, png: Path, baseline: float | None = None, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    # train loss of the joint stage only: alignment-stage batches are image captions, another task
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r and r.get("stage") != "align"]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    align = [r["step"] for r in rows if r.get("stage") == "align"]
    if align:
        ax.axvspan(min(align) - 1, max(align), color="#ffcc66", alpha=0.3, label="vision alignment (LM frozen)")
    if tr:
        ax.plot(*zip(*tr), label="train loss", color="#1f77b4", alpha=0.8)
    if va:
        ax.plot(*zip(*va), "o-", label="validation loss", color="#d62728")
    if baseline:
        ax.axhline(baseline, ls="--", color="gray", label=f"unigram baseline {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "herd pre-training")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    acc = [(r["step"], r["digit_acc"]) for r in rows if "digit_acc" in r]
    if acc:  # held-out digit images named correctly, on its own axis (chance = 0.1)
        ax2 = ax.twinx()
        line, = ax2.plot(*zip(*acc), "s-", color="#2ca02c", alpha=0.8, label="digit accuracy (right)")
        ax2.axhline(0.1, ls=":", color="#2ca02c", alpha=0.6)
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("digit accuracy (chance 0.1)")
        handles.append(line)
        labels.append(line.get_label())
    ax.legend(handles, labels, loc="upper right")
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)


# ----- the stage ----------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a pre-training run. Returns a summary dict (also written to OUT/summary.json)."""
    cfg.validate()
    from herd.model.llama4 import Llama4
    from herd.presets import get_config

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = distributed.setup()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = env.device
    if cfg.width or cfg.layers:
        if cfg.preset != "tiny":
            raise ValueError("--width/--layers rescale the tiny preset only")
        from herd.presets import scaled_tiny

        model_config = scaled_tiny(cfg.width or 256, cfg.layers or 4)
    else:
        model_config = get_config(cfg.preset)
    tokenizer = prepare_tokenizer(cfg, model_config.text.vocab_size, out, env)

    # model: same seed on every rank, MetaP or standard init
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = Llama4(model_config)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    if cfg.metap:
        metap.init_metap(model, metap.MetaPConfig(base_width=cfg.metap_base_width), generator=gen)
    else:
        metap.standard_init(model, generator=gen)
    if cfg.fp8:
        from herd.train.fp8 import convert_to_fp8

        n = convert_to_fp8(model, cfg.fp8)
        if env.is_main:
            print(f"FP8 ({cfg.fp8}): {n} linear/expert modules converted")
    model, optimizer = build_optimizer(model, cfg, env)

    # data
    train_data, val_data = build_data(cfg, tokenizer, model_config, env)
    phases = []
    if cfg.align_steps and model_config.vision is not None:
        align_data, _ = build_data(cfg, tokenizer, model_config, env, weights={"digits": 1.0})
        lm_params = [p for n, p in model.named_parameters()
                     if cfg.align_freeze == "lm" and n.removeprefix("module.").startswith("language_model.")]
        phases.append(Phase("align", align_data, cfg.align_start, cfg.align_start + cfg.align_steps, lm_params))
    distill_objective = None
    if cfg.teacher:  # codistillation: the teacher's distribution joins the data's labels (validation stays CE)
        from herd.train import distill

        distill_objective = distill.build_objective(cfg, model_config, tokenizer, train_data, env)
    from herd.data import unigram_baseline

    baseline = unigram_baseline(train_data.shard(0, 1))  # on the whole global batch, whatever the rank
    objective = NextTokenLoss(device, tokenizer.bos_id, cfg.document_mask)
    evals = [validation_loss(objective, val_data, env, cfg)]
    if model_config.vision is not None:  # every rank runs it (FSDP gathers need all ranks)
        from herd.data import digit_eval_set

        digit_eval = digit_eval_set(tokenizer, model_config.vision, data_config(cfg), split="val", limit=200)
        evals.append(lambda m: {"digit_acc": digit_accuracy(m, digit_eval, cfg, device)})

    def plot(metrics_path, png):
        plot_curves(metrics_path, png, baseline, f"{cfg.preset}: {cfg.max_steps} steps")

    summary = run(cfg, model, optimizer, distill_objective or objective, train_data, env, tokenizer=tokenizer,
                  phases=phases, evals=evals, name="joint", plot=plot, summary={"baseline_unigram": baseline},
                  extra_state={"distill": distill_objective} if distill_objective else None)
    distributed.teardown(env)
    return summary


@torch.no_grad()
def digit_accuracy(model, digit_eval, cfg: TrainConfig, device) -> float | None:
    """Share of held-out digit images whose digit token gets the highest logit among "0".."9"
    after the prompt "<image> This is a handwritten digit " (rank 0 only; None without vision)."""
    if digit_eval is None:
        return None
    model.eval()
    correct = 0
    for ids, pixels, targets in digit_eval.batches(64):
        with autocast(cfg.bf16, device):
            logits = model(ids.to(device), pixel_values=pixels.to(device), logits_slice=slice(-1, None))
        correct += int((digit_eval.predictions(logits.float()) == targets).sum())
    model.train()
    return correct / max(len(digit_eval), 1)

