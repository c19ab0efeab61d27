"""The one training loop every stage shares: pre-training, mid-training, SFT, DPO, distillation.

A stage supplies three things and the loop does the rest (learning-rate schedule, gradient
accumulation, global loss normalisation, clipping, AdamW, MoE balancing, evaluation, logging,
crash-safe checkpoints with bit-exact resume, FSDP2/DDP under torchrun, the final export):

  * an **objective** (`Objective`): `tokens(batch)` says how many loss units a batch holds (tokens
    for language-model losses, pairs for DPO) before any forward runs, and `objective(model, batch)`
    returns `(summed loss, loss units, metric sums)`. The loop divides by the units of the *whole*
    global batch (all micro-batches, all ranks), so the gradient is that of the global mean however
    the batch is split; metric sums are reported as global means (e.g. DPO's `rewards/chosen`).
  * a **batch source** (`BatchSource`): an iterator of batches with `state_dict()` /
    `load_state_dict()`, saved in every checkpoint so a resumed run sees exactly the batches the
    uninterrupted run would have seen. `Phase` gives a span of steps its own source and, if
    needed, parameters that stay frozen (pre-training's vision-alignment stage).
  * **evaluation hooks**: callables `model → {metric: value}` run every `eval_every` steps on every
    rank (FSDP needs all ranks in each forward); their metrics land in the same metrics.jsonl row.
    `validation_loss(objective, batches, env, cfg)` turns an objective into one.

Adding a stage (mid-training, distillation, ...), in its own module:

    class MyObjective:                                   # herd.train.loop.Objective
        def tokens(self, batch): return int((batch.labels != -100).sum())
        def __call__(self, model, batch):
            loss_sum = ...                               # fp32 scalar, summed over loss units
            return loss_sum, self.tokens(batch), {"my/metric": summed_value}

    model, tokenizer = init_from(cfg.init)               # or build from a preset as herd train does
    model, optimizer = build_optimizer(model, cfg, env)
    summary = run(cfg, model, optimizer, MyObjective(), source, env, tokenizer=tokenizer,
                  evals=[validation_loss(MyObjective(), val_batches, env, cfg)])

Under torchrun (FSDP2) every rank must run the same modules in a step: an objective whose batches
sometimes carry images and sometimes not gives image-less batches one blank, unlabelled tile
(`vision_keepalive` in herd.train.sft.MaskedNextTokenLoss and herd.train.dpo.DPOLoss), or the
gradient reduction of the vision tower's parameters hangs or aborts.

The stage's config dataclass subclasses `LoopConfig` (help text in `field(metadata={"help": ...})`)
and gets its command-line flags from `herd.train.flags.add_dataclass_arguments`.

Run directory (one format for every stage): metrics.jsonl (one JSON object per logged step),
loss.png, checkpoints/ (herd.train.checkpoint: model in the HF layout + trainer_state.pt), the
final model as a Hugging Face directory, summary.json, train_config.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Protocol

import torch

from herd.train import balance, checkpoint, distributed, metap
from herd.train.schedule import lr_multiplier


# ----- the seams ----------------------------------------------------------------------------------
class Objective(Protocol):
    """What a stage optimises. Both methods see one micro-batch of this rank."""

    def tokens(self, batch) -> int:
        """Loss units in the batch (tokens, pairs, ...), known before the forward."""

    def __call__(self, model, batch) -> tuple[torch.Tensor, int, dict[str, float]]:
        """(summed loss: fp32 scalar with grad, loss units, metric *sums* over those units)."""


class BatchSource(Protocol):
    """An endless iterator of batches whose position can be saved and restored exactly."""

    def __iter__(self) -> Iterator: ...

    def __next__(self): ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Phase:
    """Steps [start, stop) draw from their own source and leave `frozen` parameters untouched."""

    name: str
    source: BatchSource
    start: int
    stop: int
    frozen: list = field(default_factory=list)


EvalHook = Callable[[torch.nn.Module], dict]


@dataclass
class LoopConfig:
    """Settings of the loop itself; a stage's config subclasses this."""

    out: str = field(default="runs/tiny", metadata={"help": "run directory"})
    max_steps: int = field(default=300, metadata={"help": "optimizer steps (the schedule spans them)"})
    stop_after: int | None = field(default=None, metadata={
        "help": "stop (with a checkpoint) after this step; --resume continues the same schedule"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    schedule: Literal["cosine", "wsd", "constant"] = field(default="cosine", metadata={"help": "learning-rate schedule"})
    warmup: int = field(default=30, metadata={"help": "linear warm-up steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a fraction of the peak"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = field(default=1.0, metadata={"help": "gradient-norm clipping"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast for matmuls (--no-bf16: fp32)"})
    metap: bool = field(default=True, metadata={"help": "MetaP per-tensor learning-rate multipliers"})
    metap_base_width: int = 256
    vision_lr_mult: float = field(default=1.0, metadata={
        "help": "learning-rate multiplier of the vision tower and projector (on top of MetaP's)"})
    balance: Literal["bias", "aux", "none"] = field(default="bias", metadata={
        "help": "MoE load balancing: aux-loss-free bias, switch auxiliary loss, or none"})
    bias_rate: float = 1e-3
    aux_coef: float = 1e-2
    eval_every: int = field(default=50, metadata={"help": "evaluate every N steps (and at the end)"})
    log_every: int = field(default=10, metadata={"help": "write a metrics.jsonl row every N steps"})
    ckpt_every: int = field(default=100, metadata={"help": "checkpoint every N steps (and at the end)"})
    keep: int = field(default=3, metadata={"help": "checkpoints to keep"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in --out"})
    parallel: Literal["fsdp", "ddp"] = field(default="fsdp", metadata={"help": "multi-process wrapping (torchrun)"})
    threads: int | None = field(default=None, metadata={"help": "torch threads per process"})
    progress: bool = field(default=True, metadata={"help": "progress bar"})

    def validate(self) -> None:
        if self.max_steps <= 0 or self.grad_accum <= 0:
            raise ValueError("max_steps and grad_accum must be positive")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ValueError(f"--schedule must be cosine, wsd or constant, got {self.schedule!r}")
        if self.balance not in ("bias", "aux", "none"):
            raise ValueError(f"--balance must be bias, aux or none, got {self.balance!r}")
        if not self.vision_lr_mult >= 0:
            raise ValueError(f"--vision-lr-mult must be >= 0 (0 freezes the vision side), got {self.vision_lr_mult}")


# ----- building blocks ----------------------------------------------------------------------------
def autocast(enabled: bool, device: torch.device):
    """bf16 autocast for the matmuls (fp32 master weights), or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def init_from(directory: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer) of a Hugging Face model directory (a previous stage's run), float32 for training."""
    from herd.model.weights import load_model
    from herd.tokenizer import load_tokenizer

    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise ValueError(f"--init {directory}: not a model directory (no config.json)")
    if not (directory / "tokenizer.json").exists():
        raise ValueError(f"--init {directory}: no tokenizer.json next to the model")
    model = load_model(directory, dtype=torch.float32, device=device)
    return model, load_tokenizer(directory)


def build_optimizer(model, cfg: LoopConfig, env, verbose: bool = True):
    """Wrap the model for this process group (FSDP2 / DDP / as is) and build fused AdamW over its
    MetaP parameter groups (one group per learning-rate multiplier; `cfg.metap=False`: one rate).
    Returns (model to train, optimizer)."""
    mp_cfg = metap.MetaPConfig(base_width=cfg.metap_base_width, vision_lr_mult=cfg.vision_lr_mult)
    groups = metap.param_groups(model, cfg.lr, cfg.weight_decay, mp_cfg, enabled=cfg.metap)
    if env.is_main and cfg.progress and verbose:
        print(f"AdamW parameter groups ({'MetaP' if cfg.metap else 'standard: MetaP off'}, lr {cfg.lr:g}):\n"
              + metap.describe(groups))
    names = {id(p): n for g in groups for p, n in zip(g["params"], g["names"])}
    wrapped = distributed.wrap(model, env, cfg.parallel)
    # rebuild the groups on the (possibly sharded) parameters, same order and multipliers
    by_name = dict(wrapped.named_parameters())
    for g in groups:
        g["params"] = [by_name.get(names[id(p)], p) for p in g["params"]]
    opt_groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    # fused AdamW: one kernel per step (3× faster than foreach on CPU); sharded FSDP2 parameters keep foreach
    optimizer = torch.optim.AdamW(opt_groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                  eps=1e-8, **({"foreach": True} if env.distributed else {"fused": True}))
    return wrapped, optimizer


def validation_loss(objective: Objective, batches, env, cfg: LoopConfig, key: str = "val_loss") -> EvalHook:
    """An evaluation hook: the objective's global mean over a fixed set of batches (all ranks)."""

    @torch.no_grad()
    def hook(model) -> dict:
        model.eval()
        total, count = 0.0, 0
        device = env.device
        for batch in batches:
            with autocast(cfg.bf16, device):
                loss, n, _ = objective(model, batch)
            total += float(loss)
            count += int(n)
        model.train()
        total = distributed.mean_across_ranks(total, env) * env.world
        count = distributed.mean_across_ranks(count, env) * env.world
        return {key: total / max(count, 1)}

    return hook


def save_state(out, step, model, optimizer, cfg, env, source, phases, extra: dict) -> None:
    """One crash-safe checkpoint (full tensors, gathered to rank 0) with everything resume needs."""
    base = distributed.unwrap(model)
    weights = distributed.full_model_state(model, env)
    opt_state = distributed.full_optimizer_state(model, optimizer, env)
    if env.is_main:
        state = {"step": step, "optimizer": opt_state, "data": source.state_dict(),
                 "phases": {p.name: p.source.state_dict() for p in phases},
                 "extra": {k: v.state_dict() for k, v in extra.items()},
                 "expert_bias": [m.expert_bias.detach().cpu().clone() for m in balance.moe_modules(base)],
                 "rng": checkpoint.rng_state(), "config": json.dumps(dataclasses.asdict(cfg))}
        checkpoint.save_checkpoint(out, step, base, state, keep=cfg.keep, model_state=weights)
    distributed.barrier(env)


def restore_state(out, model, optimizer, env, source, phases, extra: dict) -> int:
    """Load the newest checkpoint under out/ into everything; returns its step (0 if none)."""
    from herd.model.weights import read_model_tensors

    ckpt = checkpoint.latest_checkpoint(out)
    if ckpt is None:
        if env.is_main:
            print(f"--resume: no checkpoint under {out}/checkpoints, starting from scratch")
        return 0
    state = checkpoint.load_trainer_state(ckpt)
    base = distributed.unwrap(model)
    weights = {k: v.clone() for k, v in read_model_tensors(ckpt, base.config.is_multimodal).items()}
    distributed.load_full_model_state(model, weights, env)
    distributed.load_full_optimizer_state(model, optimizer, state["optimizer"], env)
    for moe, bias in zip(balance.moe_modules(base), state["expert_bias"]):
        moe.expert_bias.copy_(bias)
    source.load_state_dict(state["data"])
    for p in phases:
        if p.name in state.get("phases", {}):
            p.source.load_state_dict(state["phases"][p.name])
    for k, v in extra.items():
        if k in state.get("extra", {}):
            v.load_state_dict(state["extra"][k])
    checkpoint.set_rng_state(state["rng"])
    if env.is_main:
        print(f"resumed from {ckpt} at step {state['step']}")
    return state["step"]


# ----- the loop -----------------------------------------------------------------------------------
def run(cfg: LoopConfig, model, optimizer, objective: Objective, source: BatchSource, env, *,
        tokenizer=None, phases: list[Phase] = (), evals: list[EvalHook] = (), extra_state: dict | None = None,
        name: str = "train", plot: Callable[[Path, Path], None] | None = None, summary: dict | None = None) -> dict:
    """Train `model` (already wrapped by `build_optimizer`) for cfg.max_steps, resuming if asked.

    name: the stage name logged in each row ("stage"); a Phase logs its own name.
    extra_state: objects with state_dict()/load_state_dict() saved in every checkpoint.
    plot: called as plot(metrics.jsonl, loss.png) at the end on rank 0.
    Returns the summary (also OUT/summary.json): step, loss and every evaluation metric of the last
    rows, wall_s, tokens (loss units seen), plus `summary`'s entries.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = env.device
    base_model = distributed.unwrap(model)
    extra_state = extra_state or {}
    metrics_path = out / "metrics.jsonl"
    start_step = restore_state(out, model, optimizer, env, source, phases, extra_state) if cfg.resume else 0
    source_it = iter(source)
    phase_its = {p.name: iter(p.source) for p in phases}
    if env.is_main:
        if start_step == 0:
            metrics_path.write_text("")
        else:  # drop lines logged after the checkpoint we resumed from
            keep = [ln for ln in metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start_step]
            metrics_path.write_text("".join(ln + "\n" for ln in keep))
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    tracker = balance.LoadTracker(base_model)
    model.train()
    progress = None
    if env.is_main and cfg.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.max_steps, initial=start_step, desc=name, unit="step", dynamic_ncols=True)
    tokens_seen = 0
    t_start = t_log = time.perf_counter()
    tokens_since_log = 0
    last: dict = {}
    eval_keys: set[str] = set()
    summary = dict(summary or {})

    for step in range(start_step, cfg.max_steps):
        phase = next((p for p in phases if p.start <= step < p.stop), None)
        it = phase_its[phase.name] if phase else source_it
        mult = lr_multiplier(step, cfg.max_steps, cfg.warmup, cfg.schedule, cfg.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * mult * g.get("lr_mult", 1.0)
        batches = [next(it) for _ in range(cfg.grad_accum)]
        local_units = sum(objective.tokens(b) for b in batches)
        global_units = round(distributed.mean_across_ranks(local_units, env) * env.world)
        loss_sum, metric_sums = 0.0, {}
        for b in batches:
            with autocast(cfg.bf16, device):
                loss, _, metrics = objective(model, b)
            # gradients are averaged over ranks; scale so the total is the global per-unit mean
            scaled = loss * (env.world / max(global_units, 1))
            if cfg.balance == "aux":
                aux = balance.switch_aux_loss(base_model)
                if aux is not None:
                    scaled = scaled + cfg.aux_coef * aux / cfg.grad_accum
            scaled.backward()
            loss_sum += float(loss.detach())
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
            tracker.observe()
        if phase is not None:  # frozen parameters: drop their gradients (works the same under FSDP/DDP)
            for p in phase.frozen:
                p.grad = None
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        counts = tracker.take()
        if cfg.balance == "bias":
            balance.update_bias(base_model, counts, cfg.bias_rate)
        step_loss = distributed.mean_across_ranks(loss_sum, env) * env.world / max(global_units, 1)
        tokens_seen += global_units
        tokens_since_log += global_units
        done = step + 1
        record = None
        if done % cfg.log_every == 0 or done == cfg.max_steps or done == start_step + 1:
            now = time.perf_counter()
            record = {"step": done, "loss": round(step_loss, 5), "lr": cfg.lr * mult,
                      "tokens_per_s": round(tokens_since_log / max(now - t_log, 1e-9), 1),
                      "grad_norm": round(grad_norm, 4), "stage": phase.name if phase else name,
                      **{k: round(distributed.mean_across_ranks(v, env) * env.world / max(global_units, 1), 5)
                         for k, v in sorted(metric_sums.items())},
                      **{k: round(v, 4) for k, v in balance.load_stats(counts).items()}}
            t_log, tokens_since_log = now, 0
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            record = record or {"step": done, "loss": round(step_loss, 5)}
            for hook in evals:
                for k, v in hook(model).items():
                    if v is not None:
                        record[k] = round(float(v), 5)
                        eval_keys.add(k)
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
            save_state(out, done, model, optimizer, cfg, env, source, phases, extra_state)
        if stopping:
            break
    if progress is not None:
        progress.close()

    # final model in the Hugging Face layout, curves, summary
    full = distributed.full_model_state(model, env)
    if env.is_main:
        from herd.model.weights import save_model

        save_model(base_model, out, state_dict=full)
        if tokenizer is not None:
            tokenizer.save(out)
        if plot is not None:
            plot(metrics_path, out / "loss.png")
        summary.update({k: v for k, v in last.items() if k in ("step", "loss") or k in eval_keys})
        summary["wall_s"] = round(time.perf_counter() - t_start, 1)
        summary["tokens"] = tokens_seen
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary if env.is_main else {}
