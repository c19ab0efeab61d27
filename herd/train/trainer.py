"""The pre-training loop: `herd train --preset tiny --max-steps N --out DIR [--resume]`.

One step = `grad_accum` micro-batches → mean next-token loss over all loss tokens of the global
batch → backward → gradient clipping → AdamW (MetaP parameter groups) → MoE bias update.

Stages, as Meta describes the recipe:
  * vision alignment (`--align-steps N`, from step `--align-start S`): image-caption batches
    only; the language model is frozen (its gradients are dropped) while the vision tower and
    projector learn to speak its language. Meta aligns against a pre-trained language model, so
    a from-scratch run places this stage after S steps of joint pre-training;
  * joint training on the full text + image mixture, everything unfrozen, before and after.

Packed rows hold several documents; attention is masked so it never crosses from one into the
next (`--no-document-mask` to ablate), as Meta trains Llama 3 and 4.

Outputs in OUT/: metrics.jsonl (one JSON object per logged step: step, loss, lr, tokens_per_s,
grad_norm, expert-load statistics, val_loss / digit_acc at evaluations), loss.png, checkpoints/
(crash-safe, the newest `keep`), and the final model as a Hugging Face directory (config.json,
model.safetensors, tokenizer.json) that `herd.load_model(OUT)` and transformers read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from herd.train import balance, checkpoint, distributed, metap
from herd.train.schedule import lr_multiplier


@dataclass
class TrainConfig:
    out: str = "runs/tiny"
    preset: str = "tiny"
    width: int | None = None  # the tiny recipe at another hidden size (MetaP transfer experiments)
    layers: int | None = None
    max_steps: int = 300
    stop_after: int | None = None  # stop at this step (a planned interruption; the schedule spans max_steps)
    batch_size: int = 8  # global batch, in sequences (split across ranks)
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    bf16: bool = True  # bf16 autocast for matmuls
    document_mask: bool = True  # attention stays inside each packed document (off: ablation)
    metap: bool = True
    metap_base_width: int = 256
    fp8: str | None = None  # None | tensorwise | rowwise
    balance: str = "bias"  # bias | aux | none
    bias_rate: float = 1e-3
    aux_coef: float = 1e-2
    align_steps: int = 0  # vision alignment stage (language model frozen) ...
    align_start: int = 0  # ... starting at this step (after some text pre-training, as Meta does)
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    ckpt_every: int = 100
    keep: int = 3
    seed: int = 0
    resume: bool = False
    tokenizer: str | None = None  # a directory with tokenizer.json; trained into OUT when absent
    mixture: dict | None = None  # data mixture weights by source name
    data_cache: str | None = None
    max_docs: int | None = None  # per data source: only the first N documents (quick runs, tests)
    parallel: str = "fsdp"  # fsdp | ddp (multi-process only)
    threads: int | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.max_steps <= 0 or self.batch_size <= 0 or self.seq_len <= 0 or self.grad_accum <= 0:
            raise ValueError("max_steps, batch_size, seq_len and grad_accum must be positive")
        if self.fp8 not in (None, "tensorwise", "rowwise"):
            raise ValueError(f"--fp8 must be tensorwise or rowwise, got {self.fp8!r}")
        if self.balance not in ("bias", "aux", "none"):
            raise ValueError(f"--balance must be bias, aux or none, got {self.balance!r}")
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


def autocast(cfg: TrainConfig, device: torch.device):
    if not cfg.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model, val, cfg: TrainConfig, env, device, bos_id=None) -> float:
    """Mean validation loss (nats/token) over the first `eval_batches` validation batches."""
    model.eval()
    total, count = 0.0, 0
    for batch in val:
        total += float(forward(model, batch, cfg, device, bos_id, labels=batch.labels.to(device)))
        count += int((batch.labels != -100).sum())
    model.train()
    total = distributed.mean_across_ranks(total, env) * env.world
    count = distributed.mean_across_ranks(count, env) * env.world
    return total / max(count, 1)


def _px(batch, device):
    return None if batch.pixel_values is None else batch.pixel_values.to(device)


def document_ids(input_ids: torch.Tensor, bos_id: int | None) -> torch.Tensor | None:
    """[B, T] ids of the packed documents: every <|begin_of_text|> starts a new one."""
    if bos_id is None:
        return None
    return (input_ids == bos_id).cumsum(dim=-1)


def forward(model, batch, cfg: TrainConfig, device, bos_id, labels: torch.Tensor | None = None):
    """Logits for a batch, with document masking when configured; given `labels`, the summed
    next-token loss instead (float32; the LM head fused with the loss, see herd.model.loss)."""
    ids = batch.input_ids.to(device)
    docs = document_ids(ids, bos_id) if cfg.document_mask else None
    with autocast(cfg, device):
        return model(ids, pixel_values=_px(batch, device), document_ids=docs, labels=labels)


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


# ----- the loop -----------------------------------------------------------------------------------
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
    mp_cfg = metap.MetaPConfig(base_width=cfg.metap_base_width)
    if cfg.metap:
        metap.init_metap(model, mp_cfg, generator=gen)
    else:
        metap.standard_init(model, generator=gen)
    if cfg.fp8:
        from herd.train.fp8 import convert_to_fp8

        n = convert_to_fp8(model, cfg.fp8)
        if env.is_main:
            print(f"FP8 ({cfg.fp8}): {n} linear/expert modules converted")
    groups = metap.param_groups(model, cfg.lr, cfg.weight_decay, mp_cfg, enabled=cfg.metap)
    if env.is_main and cfg.progress:
        print(f"AdamW parameter groups ({'MetaP' if cfg.metap else 'standard: MetaP off'}, lr {cfg.lr:g}):\n"
              + metap.describe(groups))
    names = {id(p): n for g in groups for p, n in zip(g["params"], g["names"])}
    base_model = model
    model = distributed.wrap(model, env, cfg.parallel)
    # rebuild the groups on the (possibly sharded) parameters, same order and multipliers
    by_name = dict(model.named_parameters())
    for g in groups:
        g["params"] = [by_name.get(names[id(p)], p) for p in g["params"]]
    opt_groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    # fused AdamW: one kernel per step (3× faster than foreach on CPU); sharded FSDP2 parameters keep foreach
    optimizer = torch.optim.AdamW(opt_groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                  eps=1e-8, **({"foreach": True} if env.distributed else {"fused": True}))

    # data
    train_data, val_data = build_data(cfg, tokenizer, model_config, env)
    align_data = None
    if cfg.align_steps and model_config.vision is not None:
        align_data, _ = build_data(cfg, tokenizer, model_config, env, weights={"digits": 1.0})
    from herd.data import unigram_baseline

    baseline = unigram_baseline(train_data.shard(0, 1))  # on the whole global batch, whatever the rank
    digit_eval = None
    if model_config.vision is not None:  # every rank runs it (FSDP gathers need all ranks)
        from herd.data import digit_eval_set

        digit_eval = digit_eval_set(tokenizer, model_config.vision, data_config(cfg), split="val", limit=200)
    train_it = iter(train_data)
    align_it = iter(align_data) if align_data is not None else None

    # resume
    start_step = 0
    metrics_path = out / "metrics.jsonl"
    if cfg.resume:
        ckpt = checkpoint.latest_checkpoint(out)
        if ckpt is None:
            if env.is_main:
                print(f"--resume: no checkpoint under {out}/checkpoints, starting from scratch")
        else:
            state = checkpoint.load_trainer_state(ckpt)
            from herd.model.weights import read_model_tensors

            weights = {k: v.clone() for k, v in read_model_tensors(ckpt, model_config.is_multimodal).items()}
            distributed.load_full_model_state(model, weights, env)
            distributed.load_full_optimizer_state(model, optimizer, state["optimizer"], env)
            for moe, bias in zip(balance.moe_modules(base_model), state["expert_bias"]):
                moe.expert_bias.copy_(bias)
            train_data.load_state_dict(state["data"])
            train_it = iter(train_data)
            if align_data is not None and state.get("align_data") is not None:
                align_data.load_state_dict(state["align_data"])
                align_it = iter(align_data)
            checkpoint.set_rng_state(state["rng"])
            start_step = state["step"]
            if env.is_main:
                print(f"resumed from {ckpt} at step {start_step}")
    if env.is_main:
        if start_step == 0:
            metrics_path.write_text("")
        else:  # drop lines logged after the checkpoint we resumed from
            keep = [ln for ln in metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start_step]
            metrics_path.write_text("".join(ln + "\n" for ln in keep))
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    tracker = balance.LoadTracker(base_model)
    model.train()
    lm_params = [p for n, p in model.named_parameters() if n.removeprefix("module.").startswith("language_model.")]
    progress = None
    if env.is_main and cfg.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    tokens_seen = 0
    t_start = time.perf_counter()
    t_log = time.perf_counter()
    tokens_since_log = 0
    last: dict = {}
    summary: dict = {"baseline_unigram": baseline}

    for step in range(start_step, cfg.max_steps):
        aligning = align_it is not None and cfg.align_start <= step < cfg.align_start + cfg.align_steps
        it = align_it if aligning else train_it
        mult = lr_multiplier(step, cfg.max_steps, cfg.warmup, cfg.schedule, cfg.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * mult * g["lr_mult"]
        batches = [next(it) for _ in range(cfg.grad_accum)]
        local_tokens = sum(int((b.labels != -100).sum()) for b in batches)
        global_tokens = round(distributed.mean_across_ranks(local_tokens, env) * env.world)
        loss_sum = 0.0
        for b in batches:
            loss = forward(model, b, cfg, device, tokenizer.bos_id, labels=b.labels.to(device))
            # gradients are averaged over ranks; scale so the total is the global per-token mean
            scaled = loss * (env.world / max(global_tokens, 1))
            if cfg.balance == "aux":
                aux = balance.switch_aux_loss(base_model)
                if aux is not None:
                    scaled = scaled + cfg.aux_coef * aux / cfg.grad_accum
            scaled.backward()
            loss_sum += float(loss.detach())
            tracker.observe()
        if aligning:  # language model frozen: drop its gradients (works the same under FSDP/DDP)
            for p in lm_params:
                p.grad = None
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        counts = tracker.take()
        if cfg.balance == "bias":
            balance.update_bias(base_model, counts, cfg.bias_rate)
        step_loss = distributed.mean_across_ranks(loss_sum, env) * env.world / max(global_tokens, 1)
        tokens_seen += global_tokens
        tokens_since_log += global_tokens
        done = step + 1
        record = None
        if done % cfg.log_every == 0 or done == cfg.max_steps or done == start_step + 1:
            now = time.perf_counter()
            record = {"step": done, "loss": round(step_loss, 5), "lr": cfg.lr * mult,
                      "tokens_per_s": round(tokens_since_log / max(now - t_log, 1e-9), 1),
                      "grad_norm": round(grad_norm, 4), "stage": "align" if aligning else "joint",
                      **{k: round(v, 4) for k, v in balance.load_stats(counts).items()}}
            t_log, tokens_since_log = now, 0
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            record = record or {"step": done, "loss": round(step_loss, 5)}
            record["val_loss"] = round(evaluate(model, val_data, cfg, env, device, tokenizer.bos_id), 5)
            digit_acc = digit_accuracy(model, digit_eval, cfg, device)
            if digit_acc is not None:
                record["digit_acc"] = round(digit_acc, 4)
        if record and env.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            last.update(record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_seen / (time.perf_counter() - t_start):,.0f}",
                                 **({"val": f"{last['val_loss']:.3f}"} if "val_loss" in last else {}))
        stopping = cfg.stop_after is not None and done >= cfg.stop_after
        if done % cfg.ckpt_every == 0 or done == cfg.max_steps or stopping:
            save_training_checkpoint(out, done, model, base_model, optimizer, train_data, align_data, env, cfg)
        if stopping:
            break
    if progress is not None:
        progress.close()

    # final model in the Hugging Face layout, curves, summary
    full = distributed.full_model_state(model, env)
    if env.is_main:
        from herd.model.weights import save_model

        save_model(base_model, out, state_dict=full)
        tokenizer.save(out)
        plot_curves(metrics_path, out / "loss.png", baseline, f"{cfg.preset}: {cfg.max_steps} steps")
        summary.update({k: v for k, v in last.items() if k in ("step", "loss", "val_loss", "digit_acc")})
        summary["wall_s"] = round(time.perf_counter() - t_start, 1)
        summary["tokens"] = tokens_seen
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    distributed.teardown(env)
    return summary if env.is_main else {}


def save_training_checkpoint(out, step, model, base_model, optimizer, train_data, align_data, env, cfg):
    weights = distributed.full_model_state(model, env)
    opt_state = distributed.full_optimizer_state(model, optimizer, env)
    if env.is_main:
        state = {"step": step, "optimizer": opt_state, "data": train_data.state_dict(),
                 "align_data": align_data.state_dict() if align_data is not None else None,
                 "expert_bias": [m.expert_bias.detach().cpu().clone() for m in balance.moe_modules(base_model)],
                 "rng": checkpoint.rng_state(), "config": json.dumps(dataclasses.asdict(cfg))}
        checkpoint.save_checkpoint(out, step, base_model, state, keep=cfg.keep, model_state=weights)
    distributed.barrier(env)


@torch.no_grad()
def digit_accuracy(model, digit_eval, cfg: TrainConfig, device) -> float | None:
    """Share of held-out digit images whose digit token gets the highest logit among "0".."9"
    after the prompt "<image> This is a handwritten digit " (rank 0 only; None without vision)."""
    if digit_eval is None:
        return None
    model.eval()
    correct = 0
    for ids, pixels, targets in digit_eval.batches(64):
        with autocast(cfg, device):
            logits = model(ids.to(device), pixel_values=pixels.to(device), logits_slice=slice(-1, None))
        correct += int((digit_eval.predictions(logits.float()) == targets).sum())
    model.train()
    return correct / max(len(digit_eval), 1)

