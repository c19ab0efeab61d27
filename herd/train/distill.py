"""Distillation: a larger teacher's next-token distribution trains a smaller student.

Meta pre-trained Llama 4 Maverick by *codistillation* from Llama 4 Behemoth: the teacher's forward
passes supply soft targets while the student trains, "with a novel distillation loss function
that dynamically weights the soft and hard targets through training" (Meta, "The Llama 4 herd",
ai.meta.com/blog/llama-4-multimodal-intelligence, April 2025). The blog also says the teacher's
targets were computed once for most of the student's data (amortising the teacher's forwards)
and by fresh teacher forwards for data added later. The loss itself is unpublished; herd's:

    loss = w · T² · KL(p_T ‖ q_T)  +  (1 − w) · CE(q_1, data)                (per labelled token)

p_T = softmax(teacher logits / T), q_T = softmax(student logits / T): the temperature-softened
distributions of Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015),
whose T² keeps the soft gradients' size independent of T. Positions labelled -100 (padding, EOS,
image-layout targets) count in neither part. Endpoints: w = 1 is plain (T²-scaled) KL, w = 0 is
plain cross-entropy, exactly herd.model.loss.linear_cross_entropy.

Stages: `herd train --teacher DIR` (pre-training, online or offline targets) and `herd midtrain
--teacher DIR` (mid-training, online: its batches mix streams, which offline targets do not key)
build the same `DistillObjective` for the one loop (herd.train.loop); the flags and their checks
live here (`DistillSettings`, `validate_settings`).

The weight w (`--distill-weight`, `WeightSchedule`):
  * `0.7` constant;  `linear:A:B` from A at step 0 towards B at the end of training (step/max_steps);
  * `gap[:TAU]` (the default, TAU = 1 nat): the *dynamic* one. On each micro-batch,
        w = 1 − exp(−max(CE_student − CE_teacher, 0) / TAU)
    with both cross-entropies measured on the batch's own labels (no gradient through w). Meta
    describes the weighting as dynamic "through training" without a formula; we take the
    teacher–student gap as the signal because it says how much the teacher still knows that the
    student does not: early on the student is far behind (gap of several nats, w ≈ 1, learn the
    teacher's distribution, which carries far more bits per token than the one-hot label); as the
    student closes in, w falls and the data's hard labels take over, and a student that predicts
    the data as well as its teacher on a batch is no longer pulled back towards it (w = 0). It is
    stateless (a function of the batch), so resumed runs reproduce it exactly.

Teacher top-k (`--teacher-topk K`) keeps the K most likely teacher tokens per position (the
storage of offline targets is O(K), not O(vocab)). Two ways to treat the rest (`topk_mode`):
  * "renorm" (default): the teacher distribution is renormalised over its top K; the KL is
    from that truncated distribution to the student's full distribution at T;
  * "tail": the other V − K tokens are one bucket holding the teacher's remaining mass, compared
    with the student's mass on the same tokens: KL between the two coarsened distributions (a lower
    bound of the full KL, by the data-processing inequality). Needs the targets' temperature.
Both reduce to one rule: a target distribution r over the vocabulary as the student sees it
(dense: p_T; renorm: p̃ on the top K, 0 elsewhere; tail: p on the top K, p_tail · q/q_tail off
it), KL = Σ r (log r − log q_T), and d(T²·KL)/d(student logits) = T · (q_T − r).

Memory: like herd.model.loss, the student's logits are never held whole: tokens go through the
LM head in chunks, each chunk's soft and hard gradients are computed at once and accumulated
into d/dh and d/dW; the soft and hard parts are kept apart (two more head-sized products per
chunk than plain cross-entropy) so that w can depend on the batch's own losses. The teacher's
logits are chunked the same way (online targets hold the teacher's final hidden states, offline
ones K ids and log-probabilities per position).

Teacher targets come two ways (`DistillObjective`), giving the same loss on the same batch:
  * online: the frozen teacher (eval mode, no gradients) runs on the student's batch each step.
    Under torchrun with FSDP2 the teacher is sharded like the student (`shard_teacher`: one
    `fully_shard` unit per decoder layer plus the root, resharded after every forward, so a rank
    holds 1/world of the teacher's weights and gathers one layer at a time); each rank runs it on
    its own rows. With DDP every rank holds a whole copy;
  * offline (`OfflineTargets`): the teacher's top-K log-probabilities precomputed once over the
    first N batches of a training stream and stored on disk (numpy .npy, memory-mapped), keyed by
    a hash of the teacher's weights and of the data (stream settings + tokenizer); rows are found
    by the hash of their token ids and source segments, so resumed runs and any student whose
    data settings match reuse them. Another teacher or data stream → a clear error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 20  # student logits per chunk (the teacher's and the target's are the same size)
TopKMode = Literal["renorm", "tail"]


# ----- the weight schedule ------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightSchedule:
    """w, the share of the soft (teacher) part: constant, linear in training progress, or driven by
    the teacher–student gap (see the module docstring). Parse `--distill-weight` with `parse`."""

    kind: Literal["constant", "linear", "gap"] = "gap"
    start: float = 1.0  # constant: the weight; linear: the weight at step 0
    end: float = 1.0  # linear: the weight at the last step
    tau: float = 1.0  # gap: nats of teacher advantage at which w = 1 − 1/e

    @classmethod
    def parse(cls, spec: str | float) -> "WeightSchedule":
        """"0.5" | "linear:A:B" | "gap" | "gap:TAU"."""
        text = str(spec).strip()
        head, *args = text.split(":")
        try:
            if head == "gap" and len(args) <= 1:
                out = cls("gap", tau=float(args[0]) if args else 1.0)
            elif head == "linear" and len(args) == 2:
                out = cls("linear", float(args[0]), float(args[1]))
            elif not args:
                out = cls("constant", float(head), float(head))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"--distill-weight {text!r}: expected a number in [0, 1], linear:A:B or gap[:TAU]") from None
        if not (0 <= out.start <= 1 and 0 <= out.end <= 1) or not (out.tau > 0 and math.isfinite(out.tau)):
            raise ValueError(f"--distill-weight {text!r}: weights must lie in [0, 1] and TAU be a positive number")
        return out

    def __call__(self, progress: float, student_ce: float, teacher_ce: float) -> float:
        """progress = step / max_steps in [0, 1]; the cross-entropies are per-token means (nats)."""
        if self.kind == "constant":
            return self.start
        if self.kind == "linear":
            return self.start + (self.end - self.start) * min(max(progress, 0.0), 1.0)
        return 1.0 - math.exp(-max(student_ce - teacher_ce, 0.0) / self.tau)

    def __str__(self) -> str:
        return {"constant": f"{self.start:g}", "linear": f"linear:{self.start:g}:{self.end:g}",
                "gap": f"gap:{self.tau:g}"}[self.kind]


@dataclass
class DistillSettings:
    """The distillation flags of a stage config (herd train's TrainConfig, which adds
    --teacher-targets, and herd midtrain's MidtrainConfig subclass this). Check them with
    `validate_settings`."""

    teacher: str | None = field(default=None, metadata={
        "help": "codistillation: a model directory (same tokenizer) whose next-token distribution trains "
                "this model alongside the data (herd.train.distill)"})
    distill_weight: str = field(default="gap", metadata={
        "help": "weight w of the teacher's soft targets (1 − w on the data's labels): a number in [0, 1], "
                "linear:A:B over training, or gap[:TAU], dynamic: w = 1 − exp(−(CE_student − CE_teacher)/TAU)"})
    distill_temperature: float = field(default=1.0, metadata={
        "help": "softmax temperature T of teacher and student in the soft part (scaled by T²)"})
    teacher_topk: int | None = field(default=None, metadata={
        "help": "keep only the teacher's K most likely tokens per position (see --teacher-topk-mode)"})
    teacher_topk_mode: TopKMode = field(default="renorm", metadata={
        "help": "renormalise the teacher over its top K, or keep the rest as one bucket"})


def validate_settings(cfg) -> None:
    """Clear errors for distillation flags (a config with DistillSettings' fields, and optionally
    teacher_targets) before anything loads."""
    if not cfg.teacher and (getattr(cfg, "teacher_targets", None) or cfg.teacher_topk is not None
                            or cfg.distill_weight != "gap" or cfg.distill_temperature != 1.0):
        raise ValueError("--distill-weight, --distill-temperature, --teacher-topk and --teacher-targets "
                         "need --teacher DIR")
    if cfg.teacher:
        WeightSchedule.parse(cfg.distill_weight)
        if not cfg.distill_temperature > 0:
            raise ValueError(f"--distill-temperature must be positive, got {cfg.distill_temperature}")
        if cfg.teacher_topk_mode not in ("renorm", "tail"):
            raise ValueError(f"--teacher-topk-mode must be renorm or tail, got {cfg.teacher_topk_mode!r}")
        if cfg.teacher_topk is not None and cfg.teacher_topk < 1:
            raise ValueError(f"--teacher-topk must be positive, got {cfg.teacher_topk}")


# ----- teacher targets ----------------------------------------------------------------------------
@dataclass
class TopKTargets:
    """The teacher's K most likely tokens at each of N positions.

    index [N, K] token ids; logp [N, K] float32 log-probabilities at `temperature` (log_softmax of
    logits / temperature over the whole vocabulary); label_logp [N] float32 the teacher's
    log-probability of the data's next token at temperature 1 (for the gap schedule; 0 where
    the label is -100)."""

    index: torch.Tensor
    logp: torch.Tensor
    label_logp: torch.Tensor
    temperature: float
    vocab_size: int

    def __len__(self) -> int:
        return self.index.shape[0]


@dataclass
class DenseTargets:
    """Online targets: the teacher's final hidden states h [N, Ht] and LM head weight [V, Ht]; its
    logits are computed chunk by chunk (in `dtype`), never all at once. With `topk`, each chunk is
    truncated exactly as an offline precompute would (`topk_targets`)."""

    h: torch.Tensor
    weight: torch.Tensor
    dtype: torch.dtype = torch.float32
    topk: int | None = None

    def __len__(self) -> int:
        return self.h.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def logits(self, s: int, e: int) -> torch.Tensor:
        """Teacher logits of positions [s, e) → [n, V] float32."""
        with torch.autocast(self.h.device.type, enabled=False):
            return (self.h[s:e].to(self.dtype) @ self.weight.to(self.dtype).T).float()


def topk_targets(logits: torch.Tensor, labels: torch.Tensor, k: int, temperature: float) -> TopKTargets:
    """Top-k targets from teacher logits [N, V] (float32) and labels [N]: the one function both the
    online path and the offline precompute use, so the two agree bit for bit."""
    logp_T = torch.log_softmax(logits / temperature, dim=-1)
    values, index = torch.topk(logp_T, k, dim=-1)  # same order as the logits
    keep = labels != IGNORE_INDEX
    lp1 = torch.log_softmax(logits, dim=-1).gather(1, labels.masked_fill(~keep, 0)[:, None]).squeeze(1)
    return TopKTargets(index, values, lp1.masked_fill(~keep, 0.0), float(temperature), logits.shape[-1])


def _chunk_targets(targets, s: int, e: int, y: torch.Tensor, logq: torch.Tensor, T: float, mode: TopKMode):
    """(r [n, V]: the target distribution as the student sees it, teacher label log-prob [n] at T = 1)."""
    if isinstance(targets, DenseTargets):
        z = targets.logits(s, e)
        if targets.topk is None:
            keep = y != IGNORE_INDEX
            lp1 = torch.log_softmax(z, dim=-1).gather(1, y.masked_fill(~keep, 0)[:, None]).squeeze(1)
            return torch.softmax(z / T, dim=-1), lp1.masked_fill(~keep, 0.0)
        tk = topk_targets(z, y, targets.topk, T)
        index, lp, label_lp, t_file = tk.index, tk.logp, tk.label_logp, tk.temperature
    else:
        index, lp = targets.index[s:e].long(), targets.logp[s:e].float()
        label_lp, t_file = targets.label_logp[s:e].float(), targets.temperature
    r = torch.zeros_like(logq)
    if mode == "renorm":  # softmax(z/T) restricted to the top k: the stored log-probs rescaled by t_file/T
        r.scatter_(1, index, torch.softmax(lp * (t_file / T), dim=-1))
    else:  # "tail": one bucket for the rest, filled in proportion to the student's own mass there
        p_tail = (1.0 - lp.exp().sum(-1)).clamp_min(0.0)  # [n]
        rest = logq.scatter(1, index, float("-inf"))
        q_tail_log = torch.logsumexp(rest, dim=-1)  # log of the student's mass off the top k
        r = torch.exp(rest - q_tail_log[:, None]) * p_tail[:, None]
        r.scatter_(1, index, lp.exp())
    return r, label_lp


def check_targets(targets, vocab_size: int, temperature: float, mode: TopKMode) -> None:
    """Clear errors for targets that cannot serve a student of `vocab_size` at `temperature`."""
    if targets.vocab_size != vocab_size:
        raise ValueError(f"the teacher's vocabulary has {targets.vocab_size} tokens but the student's has {vocab_size}: "
                         "distillation needs the same tokenizer")
    if mode not in ("renorm", "tail"):
        raise ValueError(f"topk_mode must be 'renorm' or 'tail', got {mode!r}")
    if not temperature > 0:
        raise ValueError(f"--distill-temperature must be positive, got {temperature}")
    if isinstance(targets, DenseTargets) and targets.topk is not None and not 1 <= targets.topk <= vocab_size:
        raise ValueError(f"--teacher-topk {targets.topk} must be between 1 and the vocabulary size {vocab_size}")
    if isinstance(targets, TopKTargets) and mode == "tail" and not math.isclose(targets.temperature, temperature):
        raise ValueError(f"top-k targets stored at temperature {targets.temperature:g} cannot give the tail mass at "
                         f"{temperature:g}: use topk_mode 'renorm' or targets computed at {temperature:g}")


# ----- the fused, chunked loss --------------------------------------------------------------------
def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype


def _chunked(h, weight, labels, targets, T, mode, dtype, chunk, want_h, want_w):
    """Sums over kept tokens (soft = T²·KL, hard = CE, teacher CE) and, if asked, the gradients of
    soft and of hard with respect to h and weight (float32 for the weight)."""
    with torch.autocast(h.device.type, enabled=False):
        hc, wc = h.to(dtype), weight.to(dtype)
        sums = torch.zeros(3, dtype=torch.float32, device=h.device)  # soft, hard, teacher CE
        gh = [torch.empty_like(h), torch.empty_like(h)] if want_h else None
        gw = [torch.zeros(weight.shape, dtype=torch.float32, device=h.device) for _ in range(2)] if want_w else None
        for s in range(0, h.shape[0], chunk):
            x, y = hc[s:s + chunk], labels[s:s + chunk]
            keep = y != IGNORE_INDEX
            y0 = y.masked_fill(~keep, 0)
            z = (x @ wc.T).float()  # [n, V] student logits
            logq = torch.log_softmax(z / T, dim=-1)
            r, t_lp = _chunk_targets(targets, s, s + chunk, y, logq, T, mode)
            kl = (torch.special.xlogy(r, r) - r * logq).sum(-1)  # [n] KL(r ‖ q_T)
            logp1 = logq if T == 1 else torch.log_softmax(z, dim=-1)
            ce = -logp1.gather(1, y0[:, None]).squeeze(1)
            sums += torch.stack([(T * T * kl).masked_fill(~keep, 0).sum(), ce.masked_fill(~keep, 0).sum(),
                                 (-t_lp).masked_fill(~keep, 0).sum()])
            if not (want_h or want_w):
                continue
            g_soft = (T * (logq.exp() - r)).mul_(keep[:, None]).to(dtype)  # d(T²·KL)/dz
            g_hard = logp1.exp()
            g_hard[torch.arange(len(y), device=y.device), y0] -= 1.0  # softmax − one-hot
            g_hard = g_hard.mul_(keep[:, None]).to(dtype)
            for i, g in enumerate((g_soft, g_hard)):
                if want_h:
                    gh[i][s:s + chunk] = g @ wc
                if want_w:
                    gw[i] += g.T @ x
    return sums, gh, gw


class _LinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, targets, T, mode, dtype, chunk):
        sums, gh, gw = _chunked(h, weight, labels, targets, T, mode, dtype, chunk,
                                ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.grads, ctx.weight_dtype = (gh, gw), weight.dtype
        soft, hard, teacher_ce = sums.unbind()
        ctx.mark_non_differentiable(teacher_ce)
        return soft, hard, teacher_ce

    @staticmethod
    def backward(ctx, g_soft, g_hard, _):
        (gh, gw), ctx.grads = ctx.grads, None
        grad_h = grad_w = None
        if gh is not None:
            grad_h = gh[0] * g_soft.to(gh[0].dtype) + gh[1] * g_hard.to(gh[1].dtype)
        if gw is not None:
            grad_w = (gw[0] * g_soft + gw[1] * g_hard).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None, None


@dataclass
class DistillParts:
    """Sums over the labelled tokens: soft = T²·KL(teacher ‖ student) and hard = cross-entropy
    (float32 scalars with gradients), teacher_ce (the teacher's cross-entropy on the same labels,
    no gradient) and tokens (how many positions counted)."""

    soft: torch.Tensor
    hard: torch.Tensor
    teacher_ce: torch.Tensor
    tokens: int
    temperature: float

    def loss(self, w: float) -> torch.Tensor:
        """w · soft + (1 − w) · hard, summed over the tokens."""
        return w * self.soft + (1.0 - w) * self.hard

    @property
    def kl(self) -> torch.Tensor:
        """Summed KL(teacher ‖ student) at the temperature (soft without the T² factor)."""
        return self.soft.detach() / self.temperature ** 2


def linear_distill(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, targets,
                   temperature: float = 1.0, topk_mode: TopKMode = "renorm",
                   chunk_size: int | None = None) -> DistillParts:
    """The two parts of the distillation loss of the student logits h @ weight.T, in chunks.

    h [..., H] the student's final (normed) hidden states, weight [V, H] its LM head, labels [...]
    (already shifted, -100 ignored), targets a DenseTargets / TopKTargets over the same flattened
    positions. Combine with `DistillParts.loss(w)`; the gradients equal those of the formula on
    full logits (tests/train/test_distill.py checks against float64)."""
    h2, y = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    if h2.shape[0] != y.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match the hidden states {tuple(h.shape)}")
    if len(targets) != y.shape[0]:
        raise ValueError(f"teacher targets cover {len(targets)} positions but the batch has {y.shape[0]}")
    check_targets(targets, weight.shape[0], temperature, topk_mode)
    dtype = _compute_dtype(h)
    chunk = chunk_size or max(16, CHUNK_ELEMENTS // weight.shape[0])
    T = float(temperature)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        soft, hard, tce = _LinearDistill.apply(h2, weight, y, targets, T, topk_mode, dtype, chunk)
    else:
        soft, hard, tce = _chunked(h2, weight, y, targets, T, topk_mode, dtype, chunk, False, False)[0].unbind()
    return DistillParts(soft, hard, tce, int((y != IGNORE_INDEX).sum()), T)


# ----- teachers -----------------------------------------------------------------------------------
def teacher_key(directory: str | Path) -> str:
    """A hash of a model directory's config.json and weights (safetensors files), in read order."""
    directory = Path(directory)
    h = hashlib.sha256()
    for p in [directory / "config.json", *sorted(directory.glob("*.safetensors"))]:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()[:24]


def load_teacher(directory: str | Path, student_config, student_tokenizer, device="cpu"):
    """The frozen teacher (eval mode, no gradients) of a model directory, checked against the
    student: same vocabulary size, same tokenizer, and vision where the student sees images."""
    from herd.data.cache import tokenizer_fingerprint
    from herd.model.weights import load_model
    from herd.tokenizer import load_tokenizer

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ValueError(f"--teacher {directory}: not a model directory (no config.json)")
    if not (directory / "tokenizer.json").is_file():
        raise ValueError(f"--teacher {directory}: no tokenizer.json next to the model (needed to check it matches)")
    try:
        teacher = load_model(directory, dtype=torch.float32, device=device)
        tok = load_tokenizer(directory)
    except (OSError, KeyError, TypeError, RuntimeError, ValueError) as e:
        raise ValueError(f"--teacher {directory} does not load: {e}") from None
    tv, sv = teacher.config.text.vocab_size, student_config.text.vocab_size
    if tv != sv:
        raise ValueError(f"--teacher {directory} has a vocabulary of {tv} tokens but the student's is {sv}")
    if tokenizer_fingerprint(tok) != tokenizer_fingerprint(student_tokenizer):
        raise ValueError(f"--teacher {directory} was trained with another tokenizer than the student's "
                         "(pass the teacher's with --tokenizer)")
    if student_config.vision is not None and teacher.config.vision is None:
        raise ValueError(f"--teacher {directory} has no vision tower but the student trains on images")
    if student_config.vision is not None and teacher.config.image_token_index != student_config.image_token_index:
        raise ValueError(f"--teacher {directory}: image token id {teacher.config.image_token_index} is not the "
                         f"student's {student_config.image_token_index}")
    teacher.eval().requires_grad_(False)
    return teacher


def _hidden_and_head(h, weight):
    # a copy: under FSDP2 the gathered head weight is freed when the teacher's forward ends
    return h, weight.detach().clone()


def shard_teacher(teacher, env):
    """The frozen teacher sharded with FSDP2 across the torchrun ranks, as herd.train.distributed
    shards the student (one unit per decoder layer, the rest in the root unit), every unit
    resharded after its forward (there is no backward to keep the weights for). A rank holds
    1/world of the teacher; its forwards all-gather one layer at a time, on every rank in every
    step (the student's batches are split so every rank runs the same number). Under DDP or in
    one process the teacher stays whole."""
    if not env.distributed or env.mode != "fsdp":
        return teacher
    from torch.distributed.fsdp import fully_shard

    for layer in teacher.language_model.model.layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(teacher, reshard_after_forward=True)
    if env.is_main:
        local = sum(p.to_local().numel() for p in teacher.parameters())
        total = sum(p.numel() for p in teacher.parameters())
        print(f"teacher sharded with FSDP2 across {env.world} ranks: rank 0 holds {local} of its {total} parameters")
    return teacher


@torch.no_grad()
def teacher_forward(teacher, input_ids, pixel_values=None, document_ids=None, topk: int | None = None) -> DenseTargets:
    """Online targets of one batch: the frozen teacher's final hidden states and head (in the
    caller's autocast, as the student runs)."""
    h, w = teacher(input_ids, pixel_values=pixel_values, document_ids=document_ids, apply_head=_hidden_and_head)
    return DenseTargets(h.reshape(-1, h.shape[-1]), w, _compute_dtype(h), topk)


# ----- offline targets ----------------------------------------------------------------------------
OFFLINE_FORMAT = 1


def row_keys(batch) -> list[str]:
    """One hash per row: its token ids and the (source, document, start, end) pieces it holds
    (the pieces name the images, whose pixels the ids do not show)."""
    ids = batch.input_ids.to("cpu", torch.int64).numpy()
    return [hashlib.sha1(ids[i].tobytes() + json.dumps(batch.segments[i] if batch.segments else []).encode())
            .hexdigest() for i in range(ids.shape[0])]


def data_key(stream, tokenizer) -> str:
    """A hash of a training stream's settings (sources, sizes, mixture, seq_len, batch, seed) and
    tokenizer: the same key means the same batches in the same order."""
    from herd.data.cache import tokenizer_fingerprint

    ident = stream.state_dict()["identity"]
    return hashlib.sha256(json.dumps([ident, tokenizer_fingerprint(tokenizer)], sort_keys=True).encode()).hexdigest()[:24]


class OfflineTargets:
    """Top-k teacher targets on disk for the first `batches` global batches of one stream.

    Layout (a directory, written to a temporary name and renamed into place, never modified):
        meta.json        format, teacher and data keys, k, temperature, vocab, rows, seq_len, batches
        index.npy        uint16/int32 [R, T, k] token ids        (memory-mapped when read)
        logp.npy         float32 [R, T, k] log-probabilities at the temperature
        label_logp.npy   float32 [R, T] teacher log-prob of the data's next token at T = 1
        rows.json        the row hashes (`row_keys`), row r of the arrays
    """

    def __init__(self, path: str | Path, teacher_key: str, data_key: str):
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"--teacher-targets {path}: no offline targets there (meta.json missing)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != OFFLINE_FORMAT:
            raise ValueError(f"--teacher-targets {path}: format {self.meta.get('format')}, expected {OFFLINE_FORMAT}")
        if self.meta["teacher"] != teacher_key:
            raise ValueError(f"--teacher-targets {path} were computed by another teacher (key {self.meta['teacher']}, "
                             f"this teacher's is {teacher_key}): precompute them again into a new path")
        if self.meta["data"] != data_key:
            raise ValueError(f"--teacher-targets {path} were computed over another token stream (data key "
                             f"{self.meta['data']}, this run's is {data_key}): same data settings and seed needed")
        self.path = path
        self.index = np.load(path / "index.npy", mmap_mode="r")
        self.logp = np.load(path / "logp.npy", mmap_mode="r")
        self.label_logp = np.load(path / "label_logp.npy", mmap_mode="r")
        self.rows = {k: i for i, k in enumerate(json.loads((path / "rows.json").read_text()))}

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def temperature(self) -> float:
        return float(self.meta["temperature"])

    @property
    def batches(self) -> int:
        return int(self.meta["batches"])

    def lookup(self, batch, device="cpu") -> TopKTargets:
        """Targets for a batch's rows (any rank's share, any order), flattened to [B·T, k]."""
        idx = []
        for key in row_keys(batch):
            if key not in self.rows:
                raise ValueError(f"--teacher-targets {self.path}: a batch row is not among the precomputed "
                                 f"{self.meta['batches']} batches (ran past them, or other data)")
            idx.append(self.rows[key])
        take = lambda a: torch.from_numpy(np.stack([a[i] for i in idx]))  # noqa: E731
        k = self.k
        return TopKTargets(take(self.index).reshape(-1, k).to(device, torch.int64),
                           take(self.logp).reshape(-1, k).to(device), take(self.label_logp).reshape(-1).to(device),
                           self.temperature, int(self.meta["vocab_size"]))

    @staticmethod
    def precompute(path: str | Path, teacher, stream, n_batches: int, k: int, temperature: float, *,
                   teacher_key: str, data_key: str, bos_id: int | None, document_mask: bool = True,
                   bf16: bool = True, device="cpu", progress: bool = False) -> Path:
        """Run the teacher over the first n_batches global batches of a fresh copy of `stream`
        and write the targets to `path` (atomically). Returns the path."""
        path = Path(path)
        V = teacher.config.text.vocab_size
        if not 1 <= k <= V:
            raise ValueError(f"--teacher-topk {k} must be between 1 and the vocabulary size {V}")
        src = stream.fresh() if stream.world_size == 1 else stream.shard(0, 1).fresh()
        R, T = n_batches * src.config.batch_size, src.config.seq_len
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
        try:
            itype = np.uint16 if V <= 65536 else np.int32
            index = np.lib.format.open_memmap(tmp / "index.npy", "w+", itype, (R, T, k))
            logp = np.lib.format.open_memmap(tmp / "logp.npy", "w+", np.float32, (R, T, k))
            label_logp = np.lib.format.open_memmap(tmp / "label_logp.npy", "w+", np.float32, (R, T))
            keys: list[str] = []
            bar = range(n_batches)
            if progress:
                from tqdm import tqdm

                bar = tqdm(bar, desc="teacher targets", unit="batch")
            for b in bar:
                batch = next(src)
                ids = batch.input_ids.to(device)
                docs = (ids == bos_id).cumsum(-1) if (document_mask and bos_id is not None) else None
                px = None if batch.pixel_values is None else batch.pixel_values.to(device)
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                    dense = teacher_forward(teacher, ids, px, docs)
                labels = batch.labels.reshape(-1).to(device)
                rows = slice(b * src.config.batch_size, (b + 1) * src.config.batch_size)
                chunk = max(16, CHUNK_ELEMENTS // V)
                parts = [topk_targets(dense.logits(s, s + chunk), labels[s:s + chunk], k, temperature)
                         for s in range(0, len(labels), chunk)]
                shape = (-1, T, k)
                index[rows] = torch.cat([p.index for p in parts]).reshape(shape).cpu().numpy().astype(itype)
                logp[rows] = torch.cat([p.logp for p in parts]).reshape(shape).cpu().numpy()
                label_logp[rows] = torch.cat([p.label_logp for p in parts]).reshape(-1, T).cpu().numpy()
                keys += row_keys(batch)
            for a in (index, logp, label_logp):
                a.flush()
            del index, logp, label_logp
            (tmp / "rows.json").write_text(json.dumps(keys))
            meta = {"format": OFFLINE_FORMAT, "teacher": teacher_key, "data": data_key, "k": k,
                    "temperature": float(temperature), "vocab_size": V, "rows": R, "seq_len": T,
                    "batches": n_batches, "batch_size": src.config.batch_size}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            if path.exists():
                raise ValueError(f"--teacher-targets {path} already exists")
            os.rename(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return path


# ----- the training objective ---------------------------------------------------------------------
class DistillObjective:
    """herd.train.loop.Objective for codistillation: the student's summed loss
    w·T²·KL + (1−w)·CE over the labelled tokens, with targets from an online teacher or an
    offline file. Logs (per-token means) distill/soft_loss (T²·KL), distill/hard_loss (CE),
    distill/kl (teacher‖student KL at T), distill/teacher_ce and distill/weight (w).

    The linear schedule needs the training step: the objective counts the micro-batches it sees
    with gradients on (evaluation runs without) and saves the count in checkpoints
    (state_dict), so a resumed run continues the same schedule."""

    def __init__(self, device, bos_id: int | None, schedule: WeightSchedule, temperature: float = 1.0,
                 teacher=None, offline: OfflineTargets | None = None, topk: int | None = None,
                 topk_mode: TopKMode = "renorm", document_mask: bool = True, max_steps: int = 1, grad_accum: int = 1):
        if (teacher is None) == (offline is None):
            raise ValueError("distillation needs exactly one of an online teacher or offline targets")
        self.device, self.bos_id, self.document_mask = device, bos_id, document_mask
        self.schedule, self.temperature, self.topk, self.topk_mode = schedule, float(temperature), topk, topk_mode
        self.teacher, self.offline = teacher, offline
        self.max_steps, self.grad_accum = max_steps, grad_accum
        self.calls = 0

    def tokens(self, batch) -> int:
        return int((batch.labels != IGNORE_INDEX).sum())

    def targets(self, batch, ids, px, docs):
        if self.offline is not None:
            return self.offline.lookup(batch, self.device)
        return teacher_forward(self.teacher, ids, px, docs, self.topk)

    def __call__(self, model, batch):
        ids = batch.input_ids.to(self.device)  # [B, T]
        docs = (ids == self.bos_id).cumsum(-1) if (self.document_mask and self.bos_id is not None) else None
        px = None if batch.pixel_values is None else batch.pixel_values.to(self.device)
        labels = batch.labels.to(self.device)
        targets = self.targets(batch, ids, px, docs)
        parts: DistillParts = model(ids, pixel_values=px, document_ids=docs, apply_head=lambda h, w: linear_distill(
            h, w, labels, targets, self.temperature, self.topk_mode))
        n = max(parts.tokens, 1)
        step = self.calls // self.grad_accum
        soft, hard, tce = (float(t.detach()) for t in (parts.soft, parts.hard, parts.teacher_ce))
        w = self.schedule(step / self.max_steps, hard / n, tce / n)
        if torch.is_grad_enabled():
            self.calls += 1
        metrics = {"distill/soft_loss": soft, "distill/hard_loss": hard, "distill/kl": soft / self.temperature ** 2,
                   "distill/teacher_ce": tce,
                   "distill/weight": w * parts.tokens}
        return parts.loss(w), parts.tokens, metrics

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])


def build_objective(cfg, model_config, tokenizer, train_stream, env) -> DistillObjective:
    """The distillation objective of a `herd train --teacher DIR` run (herd.train.trainer.TrainConfig)
    or a `herd midtrain --teacher DIR` one (online only; call after the student is wrapped, so that
    env.mode says whether to shard the teacher),
    every input checked before the first step: the teacher loads and matches the student's
    vocabulary and tokenizer; top-k fits the vocabulary; offline targets (`--teacher-targets`)
    come from this teacher and this data stream and cover the run (precomputed on rank 0 when
    the path does not exist yet)."""
    from herd.train import distributed

    schedule = WeightSchedule.parse(cfg.distill_weight)
    V = model_config.text.vocab_size
    if cfg.teacher_topk is not None and not 1 <= cfg.teacher_topk <= V:
        raise ValueError(f"--teacher-topk {cfg.teacher_topk} must be between 1 and the vocabulary size {V}")
    teacher = load_teacher(cfg.teacher, model_config, tokenizer, env.device)
    document_mask = getattr(cfg, "document_mask", True)
    common = dict(device=env.device, bos_id=tokenizer.bos_id, schedule=schedule, temperature=cfg.distill_temperature,
                  topk_mode=cfg.teacher_topk_mode, document_mask=document_mask, max_steps=cfg.max_steps,
                  grad_accum=cfg.grad_accum)
    if not getattr(cfg, "teacher_targets", None):
        return DistillObjective(teacher=shard_teacher(teacher, env), topk=cfg.teacher_topk, **common)
    if cfg.teacher_topk is None:
        raise ValueError("--teacher-targets stores the teacher's top-k: give --teacher-topk K")
    if getattr(cfg, "align_steps", 0):
        raise ValueError("--teacher-targets cover the main data stream only, not the --align-steps stage: "
                         "use the online teacher (no --teacher-targets)")
    tkey, dkey = teacher_key(cfg.teacher), data_key(train_stream, tokenizer)
    need = cfg.max_steps * cfg.grad_accum
    path = Path(cfg.teacher_targets)
    if env.is_main and not path.exists():
        print(f"precomputing the teacher's top-{cfg.teacher_topk} targets for {need} batches → {path}")
        OfflineTargets.precompute(path, teacher, train_stream, need, cfg.teacher_topk, cfg.distill_temperature,
                                  teacher_key=tkey, data_key=dkey, bos_id=tokenizer.bos_id,
                                  document_mask=document_mask, bf16=cfg.bf16, device=env.device,
                                  progress=cfg.progress)
    distributed.barrier(env)
    offline = OfflineTargets(path, tkey, dkey)
    if offline.batches < need:
        raise ValueError(f"--teacher-targets {path} cover {offline.batches} batches but this run needs {need} "
                         "(max_steps × grad_accum): precompute them again into a new path")
    if offline.k != cfg.teacher_topk:
        raise ValueError(f"--teacher-targets {path} hold the top {offline.k}, not --teacher-topk {cfg.teacher_topk}")
    check_targets(TopKTargets(torch.empty(0, offline.k), torch.empty(0, offline.k), torch.empty(0),
                              offline.temperature, int(offline.meta["vocab_size"])), V, cfg.distill_temperature,
                  cfg.teacher_topk_mode)
    del teacher  # offline: the teacher's work is on disk
    return DistillObjective(offline=offline, **common)
