"""Direct preference optimisation: `herd dpo --init DIR --data pairs.jsonl --out DIR`.

DPO (Rafailov et al. 2023) trains the policy π on pairs (prompt x, chosen y_w, rejected y_l)
against a frozen reference π_ref (the starting model):

    h      = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]
    sigmoid: loss = −log σ(β·h)                     (β = 0.1 by default, TRL's default)
    ipo:     loss = (h̄ − 1/(2β))²,  h̄ with each log-ratio divided by its completion's tokens
             (IPO, Azar et al. 2023, length-normalised as TRL does)
    reward_w = β·(log π(y_w|x) − log π_ref(y_w|x)),  reward_l likewise

`preference_loss` is exactly that, a pure function of four log-prob vectors (like
eric-mitchell/direct-preference-optimization's trainers.py), tested against TRL's DPOTrainer.
log π(y|x) sums the completion tokens' log-probs; chosen and rejected rows of a batch run in one
forward ([chosen; rejected], TRL's layout), and only the hidden states that predict completion
tokens go through the LM head (`completion_logps_from_hidden`): no [2b, T, vocab] logits.

RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): `--sft-coef α` adds α × the
NLL of the chosen completions, against DPO's known failure where log π(y_w|x) and log π(y_l|x) both
fall (only their gap is rewarded). Normalised as TRL 1.16 does it (loss_type=["sigmoid", "sft"],
loss_weights=[1, α], its successor to rpo_alpha): the mean over all chosen completion tokens of the
(micro-)batch, not a mean of per-pair means. Logged as `nll_loss` (the name TRL gave it under rpo_alpha).

Reference log-probs are computed once, before training, with the starting model in eval mode,
and cached on disk: OUT/ref_logps/<key>.pt (or `--ref-cache DIR`), key = sha256 of the data
file, the model's weight files and the tokenisation settings. A rerun or resume reuses them;
a different model or data file gets another key.

Data: TRL's preference formats, one JSON object per line:
    standard:        {"prompt": "...", "chosen": "...", "rejected": "..."}
    conversational:  {"prompt": [messages], "chosen": [assistant message], "rejected": [...]}
    implicit prompt: {"chosen": [messages], "rejected": [messages]} (the shared prefix is the prompt)
A standard prompt becomes one user message, a completion one assistant message; everything is
encoded in the Llama 4 chat format, the completion's tokens (end-of-turn included) scored.

Metrics (TRL's names, means over the global batch): loss, rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, logps/chosen, logps/rejected, nll_loss (logged whatever α);
eval_ prefixed at evaluations.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from herd.train import distributed
from herd.train.chat_rows import BadLines, check_messages, encode_dialog, load_examples, read_jsonl, resolve_images
from herd.train.loop import LoopConfig, autocast, build_optimizer, init_from, run

LOSS_TYPES = ("sigmoid", "ipo")


# ----- the loss ------------------------------------------------------------------------------------
def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
                    chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None):
    """Per-pair DPO / IPO losses and rewards from summed completion log-probs, each [b].

    Returns (losses [b], chosen_rewards [b], rejected_rewards [b]); rewards are detached.
    IPO needs the completion token counts (chosen_tokens, rejected_tokens [b])."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the IPO loss needs the completion token counts")
        h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def completion_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor):
    """Summed log-probs of completion tokens: logits [N, T, V], ids/mask [N, T] (mask marks the
    completion tokens themselves) → (sums [N], token counts [N]); float32."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t+1
    target = input_ids[:, 1:]
    mask = completion_mask[:, 1:].bool()
    tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [N, T-1]
    return (tok * mask).sum(-1), mask.sum(-1)


def completion_logps_from_hidden(h: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor,
                                 completion_mask: torch.Tensor):
    """completion_logps without the full logits: only the hidden states that predict a completion
    token go through the LM head. h [N, T, H] (the model's normed hidden states), weight [V, H],
    ids/mask [N, T] → (sums [N], token counts [N]); float32. Prompt and padding positions — most of
    a preference row — never meet the [*, vocab] product (a `Llama4.forward(apply_head=...)` head)."""
    sel = completion_mask[:, 1:].bool()  # [N, T-1]: position t predicts completion token t+1
    logits = F.linear(h[:, :-1][sel], weight)  # [n, V], n = completion tokens of all rows
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, input_ids[:, 1:][sel].unsqueeze(-1)).squeeze(-1)  # [n]
    rows = sel.nonzero()[:, 0]
    sums = torch.zeros(sel.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)
    return sums, sel.sum(-1)


# ----- data ----------------------------------------------------------------------------------------
@dataclass
class Pair:
    id: str
    prompt: list  # prompt + chosen ids share the prompt prefix
    chosen: list  # full ids (prompt + completion) and the completion mask for each
    chosen_mask: list
    rejected: list
    rejected_mask: list
    tiles: list


def _as_messages(value, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        check_messages(value)
        return value
    raise ValueError(f"expected a string or a list of messages, got {type(value).__name__}")


def check_pair(row: dict) -> None:
    for key in ("chosen", "rejected"):
        if key not in row:
            raise ValueError(f"missing field {key!r}")
    if row["chosen"] == row["rejected"]:
        raise ValueError("'chosen' is identical to 'rejected'")
    if "prompt" not in row and not (isinstance(row["chosen"], list) and isinstance(row["rejected"], list)):
        raise ValueError("missing field 'prompt' (only conversational pairs may leave it implicit)")


def split_pair(row: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt messages, chosen messages, rejected messages) from any of TRL's formats."""
    if "prompt" in row:
        return _as_messages(row["prompt"], "user"), _as_messages(row["chosen"], "assistant"), \
            _as_messages(row["rejected"], "assistant")
    c, r = _as_messages(row["chosen"], "assistant"), _as_messages(row["rejected"], "assistant")
    n = 0
    while n < min(len(c), len(r)) and c[n] == r[n]:
        n += 1
    return c[:n], c[n:], r[n:]


def encode_pair(tokenizer, prompt, chosen, rejected, vision_config=None):
    """(prompt ids ending in the assistant header, [(ids, mask) of prompt+chosen, of prompt+rejected],
    prompt tiles); masks mark the completion's assistant tokens (end-of-turn included)."""
    from herd.chat import header_tokens

    p_ids, _, p_tiles = encode_dialog(tokenizer, prompt, vision_config)
    p_ids += header_tokens(tokenizer, "assistant")  # the generation prompt, as TRL's prompt_ids end
    n = len(p_ids)
    out = []
    for completion in (chosen, rejected):
        if not completion or completion[0]["role"] != "assistant":
            raise ValueError("a completion must start with an assistant message")
        ids, mask, _ = encode_dialog(tokenizer, prompt + completion, vision_config)
        out.append((ids, [False] * n + mask[n:]))
    return p_ids, out, p_tiles


def load_pairs(path, tokenizer, vision_config, max_len: int, bad: BadLines) -> list[Pair]:
    rows = read_jsonl(path, check_pair, bad)
    pairs = []
    for row in rows:
        where = row["_where"]
        try:
            base = Path(where.rsplit(":", 1)[0]).parent
            prompt, chosen, rejected = split_pair(row)
            prompt = resolve_images(prompt, base)
            p_ids, ((c, cm), (r, rm)), tiles = encode_pair(tokenizer, prompt, chosen, rejected, vision_config)
        except ValueError as e:
            bad(f"{where}: {e}")
            continue
        except Exception as e:  # noqa: BLE001 — undecodable images raise PIL's own errors
            bad(f"{where}: could not encode ({type(e).__name__}: {e})")
            continue
        if c == r:
            bad(f"{where}: 'chosen' and 'rejected' encode to the same tokens")
            continue
        if max(len(c), len(r)) > max_len:
            bad(f"{where}: {max(len(c), len(r))} tokens, longer than --max-len {max_len}")
            continue
        pairs.append(Pair(str(row.get("id", where)), p_ids, c, cm, r, rm, tiles))
    return pairs


@dataclass
class PairBatch:
    """input_ids / completion_mask [2b, T]: b chosen rows then b rejected rows (right-padded);
    ref_chosen / ref_rejected [b]; pixel_values for the chosen rows' images then the rejected's."""

    input_ids: torch.Tensor
    completion_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    index: list


def collate(pairs: list[Pair], pad_id: int, ref: torch.Tensor | None = None, index=None) -> PairBatch:
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    masks = [p.chosen_mask for p in pairs] + [p.rejected_mask for p in pairs]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.long)
    tiles = [t for p in pairs for t in p.tiles] * 2
    px = torch.cat(tiles) if tiles else None
    index = list(index) if index is not None else list(range(len(pairs)))
    b = len(pairs)
    rc = ref[index, 0] if ref is not None else torch.zeros(b)
    rr = ref[index, 1] if ref is not None else torch.zeros(b)
    return PairBatch(ids, mask, px, rc, rr, index)


class PairSource:
    """Batch source: shuffled epochs of pairs (order seeded by (seed, epoch)), `batch_size` pairs
    per global batch, this rank's share of them. State: (epoch, cursor)."""

    def __init__(self, pairs: list[Pair], ref: torch.Tensor, batch_size: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world: int = 1):
        if not pairs:
            raise ValueError("no preference pairs left (all skipped?)")
        if batch_size % world:
            raise ValueError(f"global batch {batch_size} does not split over {world} ranks")
        self.pairs, self.ref, self.batch_size, self.pad_id = pairs, ref, batch_size, pad_id
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.cursor = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))

    def __iter__(self):
        return self

    def __next__(self) -> PairBatch:
        idx = []
        for _ in range(self.batch_size):
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._perm(self.epoch)
            idx.append(int(self._order[self.cursor]))
            self.cursor += 1
        per = self.batch_size // self.world
        mine = idx[self.rank * per:(self.rank + 1) * per]
        return collate([self.pairs[i] for i in mine], self.pad_id, self.ref, mine)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": len(self.pairs), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != len(self.pairs) or state["seed"] != self.seed:
            raise ValueError("the checkpoint's data position is for other preference data")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._perm(self.epoch)


# ----- reference log-probs, cached -----------------------------------------------------------------
def _sha(path: Path, h) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def cache_key(data: str | Path, model_dir: str | Path, settings: dict) -> str:
    """sha256 over the data file, the model directory's weight and config files, and settings."""
    h = hashlib.sha256()
    _sha(Path(data), h)
    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".json")
                   and p.name not in ("metrics.jsonl", "summary.json", "train_config.json"))
    for p in files:
        h.update(p.name.encode())
        _sha(p, h)
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def compute_ref_logps(model, pairs: list[Pair], pad_id: int, device, bf16: bool, batch_size: int = 8,
                      progress: bool = True) -> torch.Tensor:
    """[n, 2] summed completion log-probs (chosen, rejected) under `model` in eval mode."""
    model.eval()
    out = []
    it = range(0, len(pairs), batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="dpo: reference log-probs", unit="batch", dynamic_ncols=True)
    for i in it:
        b = collate(pairs[i:i + batch_size], pad_id)
        ids, cmask = b.input_ids.to(device), b.completion_mask.to(device)
        with autocast(bf16, device):
            sums, _ = model(ids, pixel_values=None if b.pixel_values is None else b.pixel_values.to(device),
                            apply_head=lambda h, w: completion_logps_from_hidden(h, w, ids, cmask))
        n = len(b.index)
        out.append(torch.stack([sums[:n], sums[n:]], dim=1).cpu())
    model.train()
    return torch.cat(out).double()


def reference_logps(model, pairs, cfg, pad_id: int, env) -> tuple[torch.Tensor, Path]:
    """Cached reference log-probs (computed on rank 0's first run, read afterwards) → ([n, 2], path)."""
    from herd.model.weights import atomic_write_bytes

    key = cache_key(cfg.data, cfg.init, {"max_len": cfg.max_len, "bf16": cfg.bf16, "n": len(pairs),
                                         "skip_bad": cfg.skip_bad})
    root = Path(cfg.ref_cache) if cfg.ref_cache else Path(cfg.out) / "ref_logps"
    path = root / f"{key}.pt"
    if not path.exists():
        ref = compute_ref_logps(model, pairs, pad_id, env.device, cfg.bf16, progress=cfg.progress and env.is_main)
        if env.is_main:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, lambda f: torch.save(ref, f))
        distributed.barrier(env)
        return ref, path
    return torch.load(path, weights_only=True), path


# ----- the objective -------------------------------------------------------------------------------
class DPOLoss:
    """herd.train.loop.Objective for preference pairs: the loss unit is one pair."""

    def __init__(self, device, beta: float = 0.1, loss_type: str = "sigmoid", sft_coef: float = 0.0,
                 vision_keepalive=None):
        self.device, self.beta, self.loss_type, self.sft_coef = device, beta, loss_type, sft_coef
        self.keepalive = vision_keepalive  # model config under torchrun: see herd.train.sft.MaskedNextTokenLoss

    def tokens(self, batch: PairBatch) -> int:
        return len(batch.index)

    def __call__(self, model, batch: PairBatch):
        d = self.device
        ids, cmask = batch.input_ids.to(d), batch.completion_mask.to(d)
        px = None if batch.pixel_values is None else batch.pixel_values.to(d)
        if px is None and self.keepalive is not None:  # one extra row with a blank tile, its logits dropped
            cfg, T = self.keepalive, ids.shape[1]
            n = cfg.vision.tokens_per_tile
            row = torch.zeros((1, max(T, n)), dtype=torch.long, device=d)
            row[0, :n] = cfg.image_token_index
            ids_x = torch.cat([F.pad(ids, (0, row.shape[1] - T)), row])
            blank = torch.zeros((1, 3, cfg.vision.image_size, cfg.vision.image_size), device=d)
            sums, counts = model(ids_x, pixel_values=blank, apply_head=lambda h, w: completion_logps_from_hidden(
                h[:-1, :T], w, ids, cmask))
        else:  # one forward over [2b, T]: chosen rows, then rejected rows; the head on completion tokens only
            sums, counts = model(ids, pixel_values=px,
                                 apply_head=lambda h, w: completion_logps_from_hidden(h, w, ids, cmask))
        b = len(batch.index)
        pc, pr = sums[:b], sums[b:]
        losses, rc, rr = preference_loss(pc, pr, batch.ref_chosen.to(d, torch.float32),
                                         batch.ref_rejected.to(d, torch.float32), self.beta, self.loss_type,
                                         counts[:b].float(), counts[b:].float())
        # the chosen tokens' mean NLL over the batch (TRL's "sft" term); the loop divides the returned sum
        # by b pairs, so it enters as b × that mean
        nll = -pc.sum() / counts[:b].sum().clamp(min=1)
        loss = losses.sum() + self.sft_coef * b * nll if self.sft_coef else losses.sum()
        metrics = {"nll_loss": nll.detach() * b, "rewards/chosen": rc.sum(), "rewards/rejected": rr.sum(), "rewards/margins": (rc - rr).sum(),
                   "rewards/accuracies": (rc > rr).float().sum(), "logps/chosen": pc.detach().sum(),
                   "logps/rejected": pr.detach().sum()}
        return loss, b, {k: float(v) for k, v in metrics.items()}


def eval_hook(objective: DPOLoss, batches: list[PairBatch], env, cfg):
    """eval_loss and eval_rewards/* over fixed validation pairs (TRL's eval_ prefix)."""

    @torch.no_grad()
    def hook(model) -> dict:
        model.eval()
        total, count, sums = 0.0, 0, {}
        for b in batches:
            with autocast(cfg.bf16, env.device):
                loss, n, m = objective(model, b)
            total, count = total + float(loss), count + n
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
        model.train()
        count = distributed.mean_across_ranks(count, env) * env.world
        out = {"eval_loss": distributed.mean_across_ranks(total, env) * env.world / max(count, 1)}
        for k, v in sorted(sums.items()):
            out["eval_" + k] = distributed.mean_across_ranks(v, env) * env.world / max(count, 1)
        return out

    return hook


# ----- the stage -----------------------------------------------------------------------------------
@dataclass
class DPOConfig(LoopConfig):
    """DPO: the loop's settings plus data, β, loss type and the reference cache (TRL's defaults where
    they apply: β 0.1, sigmoid loss, lr 1e-6 is TRL's for large models; tiny ones need more)."""

    init: str = field(default="", metadata={"help": "model directory to start from (the SFT run's --out); "
                                                    "also the frozen reference"})
    data: str = field(default="", metadata={"help": "preference pairs JSONL (TRL formats)"})
    val_data: str | None = field(default=None, metadata={"help": "preference pairs for eval_* metrics"})
    out: str = field(default="runs/dpo", metadata={"help": "run directory"})
    max_steps: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "global batch, in pairs"})
    max_len: int = field(default=512, metadata={"help": "longest prompt + completion in tokens"})
    beta: float = field(default=0.1, metadata={"help": "β: strength of the pull towards the reference"})
    loss_type: Literal["sigmoid", "ipo"] = field(default="sigmoid", metadata={"help": "sigmoid (DPO) or ipo"})
    sft_coef: float = field(default=0.0, metadata={"help": "RPO: weight α of the chosen completions' mean token "
                                                           "NLL added to the loss (TRL's rpo_alpha; 0: off)"})
    ref_cache: str | None = field(default=None, metadata={"help": "directory for cached reference log-probs "
                                                                  "(default OUT/ref_logps)"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    warmup: int = field(default=5, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    metap: bool = field(default=False, metadata={"help": "MetaP learning-rate multipliers (off: one rate)"})
    skip_bad: bool = field(default=False, metadata={"help": "skip (and count) bad JSONL lines instead of failing"})
    eval_every: int = field(default=25, metadata={"help": "evaluate every N steps"})
    log_every: int = field(default=5, metadata={"help": "write a metrics.jsonl row every N steps"})

    def validate(self) -> None:
        super().validate()
        if not self.init or not self.data:
            raise ValueError("--init DIR and --data FILE are required")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError(f"--beta must be positive, got {self.beta}")
        if self.sft_coef < 0:
            raise ValueError(f"--sft-coef must be >= 0 (0 turns the NLL term off), got {self.sft_coef}")


def dpo(cfg: DPOConfig) -> dict:
    """Run (or resume) a DPO run. Returns the summary (also OUT/summary.json)."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = distributed.setup()
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    model, tokenizer = init_from(cfg.init, env.device)
    pad = tokenizer.special_tokens.get("<|finetune_right_pad|>", tokenizer.special_tokens["<|eot|>"])
    bad = BadLines(cfg.skip_bad)
    vision = model.config.vision
    pairs = load_pairs(cfg.data, tokenizer, vision, cfg.max_len, bad)
    val_pairs = load_pairs(cfg.val_data, tokenizer, vision, cfg.max_len, bad) if cfg.val_data else []
    if cfg.skip_bad and env.is_main:
        print(bad.summary())
    if not pairs:
        raise ValueError(f"{cfg.data}: no usable preference pairs")
    ref, ref_path = reference_logps(model, pairs, cfg, pad, env)
    val_ref = compute_ref_logps(model, val_pairs, pad, env.device, cfg.bf16, progress=False) if val_pairs else None
    torch.manual_seed(cfg.seed)
    source = PairSource(pairs, ref, cfg.batch_size, pad, cfg.seed, env.rank, env.world)
    model, optimizer = build_optimizer(model, cfg, env, verbose=False)
    config = distributed.unwrap(model).config
    keepalive = config if env.distributed and config.vision is not None else None
    objective = DPOLoss(env.device, cfg.beta, cfg.loss_type, cfg.sft_coef, keepalive)
    evals = []
    if val_pairs:
        per = max(1, cfg.batch_size // env.world)
        val_batches = [collate(val_pairs[i:i + per], pad, val_ref, range(i, min(i + per, len(val_pairs))))
                       for i in range(env.rank * per, len(val_pairs), per * env.world)][:8]
        evals.append(eval_hook(objective, val_batches, env, cfg))

    def plot(metrics_path, png):
        plot_dpo(metrics_path, png, f"DPO from {cfg.init}")

    summary = {"pairs": len(pairs), "bad_lines": len(bad.messages), "ref_logps": str(ref_path)}
    result = run(cfg, model, optimizer, objective, source, env, tokenizer=tokenizer, evals=evals, name="dpo",
                 plot=plot, summary=summary)
    distributed.teardown(env)
    return result


def plot_dpo(metrics_path: Path, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in Path(metrics_path).read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "rewards/chosen" in r]
    if not rows:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    s = [r["step"] for r in rows]
    a.plot(s, [r["loss"] for r in rows], label="loss")
    a.plot(s, [r["rewards/accuracies"] for r in rows], label="rewards/accuracies")
    a.set_xlabel("step")
    a.legend()
    b.plot(s, [r["logps/chosen"] for r in rows], label="logps/chosen")
    b.plot(s, [r["logps/rejected"] for r in rows], label="logps/rejected")
    b.set_xlabel("step")
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


# ----- on-policy pairs -----------------------------------------------------------------------------
def build_pairs(init: str | Path, data: str | Path, out: str | Path, k: int = 4, max_new: int = 24,
                temperature: float = 1.0, limit: int | None = None, seed: int = 0, use_reference: bool = False,
                progress: bool = True) -> dict:
    """On-policy preference pairs: sample the model k times on each verifiable prompt of a messages
    JSONL (herd data sft), pair a verified-correct reply (chosen) with a wrong one (rejected). With
    `use_reference`, prompts the model never gets right use the reference answer as chosen.
    Writes OUT/pairs.jsonl (TRL conversational format) and returns counts."""
    from herd.data.chat_data import verify
    from herd.data.longctx import write_jsonl_atomic
    from herd.train.prune import prompt_of, sample_replies

    model, tok = init_from(init)
    examples = [e for e in load_examples(data, tok, model.config.vision, 10**6, BadLines(True))
                if e.row.get("verifier")][:limit]
    if not examples:
        raise ValueError(f"{data}: no verifiable examples (rows with a 'verifier') to sample on")
    prompts = [prompt_of(tok, e, model.config.vision) for e in examples]
    replies = sample_replies(model, tok, prompts, k, max_new, temperature, seed, progress, desc="dpo pairs")
    rows, counts = [], {"prompts": len(examples), "pairs": 0, "all_right": 0, "all_wrong": 0, "from_reference": 0}
    for ex, reps in zip(examples, replies):
        scored = [(r.strip(), verify(ex.row, r)) for r in reps]
        right = [r for r, s in scored if s and s >= 1.0]
        wrong = [r for r, s in scored if not s]
        source = "policy"
        if not right and use_reference and wrong:
            right, source = [ex.row["messages"][-1]["content"]], "reference"
        if not wrong:
            counts["all_right"] += 1
            continue
        if not right:
            counts["all_wrong"] += 1
            continue
        chosen, rejected = right[0], next((w for w in wrong if w != right[0]), None)
        if rejected is None:
            continue
        counts["pairs"] += 1
        counts["from_reference"] += source == "reference"
        rows.append({"id": ex.id, "task": ex.row.get("task"), "prompt": ex.row["messages"][:-1],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}], "chosen_source": source})
    out = Path(out)
    write_jsonl_atomic(rows, out / "pairs.jsonl")
    (out / "pairs_summary.json").write_text(json.dumps(counts, indent=2) + "\n")
    return counts
