"""The learner: online RL as a stage of the shared loop (herd.train.loop).

RL differs from SFT only in where its batches come from. `RolloutSource` is the loop's batch
source: each `next()` (1) publishes the learner's weights if an optimizer step happened since the
last publish (version = steps taken), (2) draws prompts from the `PromptPool`, sends them to the
rollout backend (in-process worker or Ray actors), (3) takes finished groups through the
`StalenessBuffer`, scores them with the reward functions, updates each prompt's pass rate, drops
groups whose rewards are all equal (zero advantage) and draws more prompts until the batch holds
`prompts_per_step` groups or `refill_rounds` rounds are spent — then a smaller batch and a
warning, never a crash; (4) at --max-staleness ≥ 1, queues the next step's groups (as many as recent
steps took) so the workers generate while the loop updates. Each step logs its timeline (`time/*`:
the previous update, publish, waiting on rollouts, scoring, worker-seconds generating). `GRPOObjective` turns a batch into the clipped loss (herd.train.rl.loss)
with the learner's own forward. Everything else — schedule, clipping, AdamW, metrics.jsonl,
crash-safe checkpoints with the pool and RNG, --resume — is the shared loop's.

What is kept from GRPO and what is not (nanochat's chat_rl.py habit of saying so):
  * kept: G completions per prompt, group-normalised advantages, PPO clipping against the
    behaviour policy, token-level loss, optional k3 KL (off by default, as in TRL);
  * one optimizer step per batch (TRL's num_iterations = 1): with no second pass the behaviour
    policy is the only "old" policy, and at staleness 0 the ratio is exactly 1 at the first token;
  * dropped: a value model, reward models (rewards are verifiers), importance-sampling
    corrections for engine mismatch (the sampler *is* herd's forward: `mismatch_kl` shows it).

A run whose reward is constant for `constant_steps` consecutive steps (every group scored equal,
or no group at all) stops with `ConstantRewardError` naming the cause: GRPO's loss is exactly zero
then, and TRL/verl runs train on silently (trl#3452).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from herd.train.loop import LoopConfig
from herd.train.rl.actor import Rollout, StalenessBuffer
from herd.train.rl.loss import clipped_loss, group_advantages
from herd.train.rl.pool import PromptPool
from herd.train.rl.rewards import REWARDS, score


class ConstantRewardError(ValueError):
    """The reward carried no signal for too many consecutive steps."""


@dataclass
class RLConfig(LoopConfig):
    """Online RL (GRPO-family) from a model directory; defaults: a short run of the tiny model."""

    init: str = field(default="", metadata={"help": "model directory to start from (an SFT run's --out)"})
    tasks: str = field(default="chain_sum", metadata={
        "help": "comma-separated verifiable chat tasks (chain_sum, spell_backward, letter_counting, calculator, "
                "code_qa, digits_vqa: 1–5 digit images per prompt, needs a vision model) or a messages JSONL "
                "with verifier columns (herd data sft's train.jsonl)"})
    out: str = field(default="runs/rl", metadata={"help": "run directory"})
    max_steps: int = field(default=50, metadata={"help": "learner steps (one optimizer step each)"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate"})
    schedule: str = field(default="constant", metadata={"help": "learning-rate schedule"})
    warmup: int = field(default=0, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    metap: bool = field(default=False, metadata={"help": "MetaP learning-rate multipliers"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (off: the learner's log-probs are fp32 like "
                                                        "the sampler's)"})
    balance: str = field(default="none", metadata={"help": "MoE load balancing (none: routing changes only "
                                                           "through the RL objective)"})
    log_every: int = field(default=1, metadata={"help": "write a metrics.jsonl row every N steps"})
    eval_every: int = field(default=10, metadata={"help": "held-out reward every N steps"})
    ckpt_every: int = field(default=10, metadata={"help": "checkpoint every N steps"})
    group_size: int = field(default=8, metadata={"help": "completions per prompt (G)"})
    prompts_per_step: int = field(default=8, metadata={"help": "groups per learner step"})
    max_new_tokens: int = field(default=16, metadata={"help": "completion length limit"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (the learner's log-probs are at "
                                                               "T = 1: keep 1 for an exact ratio)"})
    eps_low: float = field(default=0.2, metadata={"help": "clip below: ratio ≥ 1 − eps_low"})
    eps_high: float = field(default=0.2, metadata={"help": "clip above: ratio ≤ 1 + eps_high (DAPO: 0.28)"})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient to the initial model (0: none loaded)"})
    scale_rewards: str = field(default="group", metadata={"help": "group: divide advantages by the group's std; "
                                                                  "none: r − mean only (Dr. GRPO)"})
    rewards: str = field(default="correctness:1,format:0.2", metadata={"help": "reward functions and weights"})
    tau: float = field(default=0.75, metadata={"help": "pool: draw prompts with pass rate in (0, tau]"})
    uniform: bool = field(default=False, metadata={"help": "draw prompts uniformly (no pass-rate pool; ablation)"})
    constant_steps: int = field(default=5, metadata={
        "help": "stop after this many consecutive steps of constant reward"})
    refill_rounds: int = field(default=4, metadata={"help": "extra draws per step to replace zero-advantage groups"})
    max_staleness: int = field(default=1, metadata={"help": "policy versions a sample may lag (0 = synchronous)"})
    workers: int = field(default=2, metadata={"help": "rollout workers (Ray actors); 0 = one in-process worker"})
    ray_address: str | None = field(default=None, metadata={"help": "join this Ray cluster (default: start Ray here)"})
    per_task: int = field(default=300, metadata={"help": "items generated per task"})
    eval_prompts: int = field(default=32, metadata={"help": "held-out prompts scored (greedy) per evaluation"})

    def validate(self) -> None:
        super().validate()
        if not self.init:
            raise ValueError("--init DIR is required (the model to start from)")
        if self.grad_accum != 1:
            raise ValueError("herd rl takes one batch per optimizer step (--grad-accum 1)")
        if self.group_size < 2:
            raise ValueError(f"--group-size must be ≥ 2 (advantages are relative to the group), "
                             f"got {self.group_size}")
        if self.prompts_per_step < 1 or self.max_new_tokens < 1:
            raise ValueError("--prompts-per-step and --max-new-tokens must be positive")
        if self.max_staleness < 0 or self.workers < 0:
            raise ValueError("--max-staleness and --workers must be ≥ 0")
        if self.scale_rewards not in ("group", "none"):
            raise ValueError(f"--scale-rewards must be group or none, got {self.scale_rewards!r}")
        if not 0 <= self.eps_low < 1 or self.eps_high < 0:
            raise ValueError("--eps-low must be in [0, 1) and --eps-high ≥ 0")
        parse_rewards(self.rewards)


def parse_rewards(spec: str) -> dict[str, float]:
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, w = part.partition(":")
        if name not in REWARDS:
            raise ValueError(f"--rewards: unknown reward {name!r}; known: {', '.join(REWARDS)}")
        try:
            out[name] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"--rewards: weight of {name!r} is not a number: {w!r}") from None
    if not out:
        raise ValueError("--rewards names no reward function")
    return out


# ----- prompts ------------------------------------------------------------------------------------
def load_items(tasks: str, per_task: int = 300, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train items, held-out items): text chat examples with a verifier, split by herd's key hash."""
    from herd.data import chat_data

    path = Path(tasks)
    if tasks.endswith(".jsonl") or path.is_file():
        if not path.is_file():
            raise ValueError(f"--tasks {tasks}: no such file")

        def read(p):
            rows = []
            for n, line in enumerate(p.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{p}:{n}: not JSON ({e.msg})") from None
            return rows

        train = read(path)
        val_path = path.parent / "val.jsonl"
        val = read(val_path) if val_path.is_file() and val_path != path else []
    else:
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        builders = {**{n: (lambda n=n: chat_data.reasoning_gym_examples(n, per_task, seed))
                       for n in chat_data.RG_TASKS},
                    "calculator": lambda: chat_data.calculator_examples(per_task, seed),
                    "digits_vqa": lambda: chat_data.digits_vqa_examples(per_task, seed),
                    "code_qa": lambda: chat_data.code_qa_examples(per_task, seed)}
        bad = [n for n in names if n not in builders]
        if bad or not names:
            raise ValueError(f"--tasks: {', '.join(bad) or '(none)'} not a verifiable task; "
                             f"known: {', '.join(builders)} (or a messages JSONL)")
        train, val = [], []
        for n in names:
            for ex in builders[n]():
                split = ex.pop("split", None) or chat_data.split_of(ex.pop("key"))
                (val if split != "train" else train).append(ex)

    def usable(ex):
        msgs = ex.get("messages") or []
        return ex.get("verifier") and msgs and msgs[-1].get("role") == "assistant"

    train, val = [e for e in train if usable(e)], [e for e in val if usable(e)]
    if not train:
        raise ValueError(f"--tasks {tasks}: no prompts with a verifier to train on")
    return train, val


def has_images(item: dict) -> bool:
    return any(isinstance(m.get("content"), list) and any(p.get("type") in ("image", "image_url")
                                                          for p in m["content"]) for m in item["messages"])


def check_vision(items: list[dict], vision_config) -> None:
    if vision_config is None and any(has_images(it) for it in items):
        raise ValueError("--tasks has prompts with images (digits_vqa) but --init is a text-only model "
                         "(no vision_config): start from a vision model")


def prompt_inputs(tokenizer, item: dict, vision_config=None) -> tuple[list[int], torch.Tensor | None]:
    """The prompt (every message but the reference reply) → (token ids, its images' tiles
    [n_tiles, 3, S, S] in order of appearance, or None for a text prompt)."""
    from herd.chat import encode_messages

    ids, tiles = encode_messages(tokenizer, item["messages"][:-1], vision_config=vision_config)
    return ids, (torch.cat(tiles) if tiles else None)


def prompt_ids(tokenizer, item: dict, vision_config=None) -> list[int]:
    return prompt_inputs(tokenizer, item, vision_config)[0]


def prompt_text(item: dict) -> str:
    """The last prompt message's text (the text parts of a multimodal message) for reward functions."""
    if len(item["messages"]) < 2:
        return ""
    content = item["messages"][-2]["content"]
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if p.get("type") == "text")
    return content or ""


# ----- the batch ----------------------------------------------------------------------------------
@dataclass
class RLBatch:
    input_ids: torch.Tensor   # [B, L] prompt + completion without its last token, right-padded
    targets: torch.Tensor     # [B, L] the next token at each position
    mask: torch.Tensor        # [B, L] 1 where the target is a completion token
    old_logps: torch.Tensor   # [B, L] behaviour log-probs of the targets (0 off the mask)
    advantages: torch.Tensor  # [B]
    stats: dict               # this step's per-step metrics (reward, pool counts, …)
    pixel_values: torch.Tensor | None = None  # [n_tiles, 3, S, S]: every row's prompt images, row by row


def collate(groups: list[Rollout], advantages: list[torch.Tensor], pad_id: int, stats: dict,
            images: list[torch.Tensor | None] | None = None) -> RLBatch:
    """Groups → one right-padded batch. images[g]: group g's prompt tiles (repeated for each of its rows)."""
    images = images or [None] * len(groups)
    kept = [[c for c, r in zip(g.completions, g.rewards) if r is not None] for g in groups]
    rows = [(g.prompt_ids, c, float(a)) for g, cs, adv in zip(groups, kept, advantages) for c, a in zip(cs, adv)]
    tiles = [img for img, cs, adv in zip(images, kept, advantages) if img is not None for _ in zip(cs, adv)]
    if not rows:
        z = torch.zeros(0, 1)
        return RLBatch(z.long(), z.long(), z, z, torch.zeros(0), stats)
    L = max(len(p) + len(c.token_ids) - 1 for p, c, _ in rows)
    B = len(rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    tgt = torch.full((B, L), pad_id, dtype=torch.long)
    mask, old = torch.zeros(B, L), torch.zeros(B, L)
    for i, (p, c, _) in enumerate(rows):
        seq = p + c.token_ids
        ids[i, :len(seq) - 1] = torch.tensor(seq[:-1])
        tgt[i, :len(seq) - 1] = torch.tensor(seq[1:])
        start = len(p) - 1  # position whose target is the first completion token
        mask[i, start:start + len(c.token_ids)] = 1
        old[i, start:start + len(c.token_ids)] = torch.tensor(c.logprobs)
    return RLBatch(ids, tgt, mask, old, torch.tensor([a for _, _, a in rows]), stats,
                   torch.cat(tiles) if tiles else None)


class GRPOObjective:
    """The loop's objective: learner log-probs of the sampled tokens → the clipped loss (token-summed)."""

    def __init__(self, cfg: RLConfig, ref_model=None):
        self.cfg, self.ref_model = cfg, ref_model

    def tokens(self, batch: RLBatch) -> int:
        return int(batch.mask.sum())

    @staticmethod
    def token_logps(model, batch: RLBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs of the targets [B, L], entropy of each position's distribution [B, L])."""
        logits = model(batch.input_ids, batch.pixel_values).float()   # [B, L, V]
        logp_all = torch.log_softmax(logits, -1)
        logps = logp_all.gather(-1, batch.targets[..., None])[..., 0]
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logps, entropy

    def __call__(self, model, batch: RLBatch):
        n = self.tokens(batch)
        if n == 0:  # nothing to learn this step: a zero loss that still reaches every parameter
            zero = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
            return zero, 0, {}
        logps, entropy = self.token_logps(model, batch)
        ref = None
        if self.cfg.beta > 0:
            with torch.no_grad():
                ref, _ = self.token_logps(self.ref_model, batch)
        loss, n, m = clipped_loss(logps, batch.old_logps, batch.advantages, batch.mask, self.cfg.eps_low,
                                  self.cfg.eps_high, self.cfg.beta, ref)
        m = {k: float(v) for k, v in m.items()}
        m["entropy"] = float((entropy.detach() * batch.mask).sum())
        # per-step values: the loop divides metric sums by the step's tokens, so hand them over × tokens
        m.update({k: v * n for k, v in batch.stats.items()})
        return loss, n, m


# ----- the batch source ---------------------------------------------------------------------------
class RolloutSource:
    """The loop's batch source for RL (see the module docstring)."""

    def __init__(self, cfg: RLConfig, model, tokenizer, items: list[dict], backend, pad_id: int):
        self.cfg, self.model, self.tokenizer, self.items, self.backend = cfg, model, tokenizer, items, backend
        self.pad_id = pad_id
        self.vision = model.config.vision
        check_vision(items, self.vision)
        self.pool = PromptPool(len(items), tau=cfg.tau, seed=cfg.seed)
        self.buffer = StalenessBuffer(cfg.max_staleness, capacity=4 * cfg.prompts_per_step + 64)
        self.reward_weights = parse_rewards(cfg.rewards)
        self.reward_fns = {k: REWARDS[k] for k in self.reward_weights}
        self.step = 0
        self.published = -1
        self.constant_run = 0
        self.in_flight: set[int] = set()
        self.taken: list[int] = []  # groups scored per step (the work-ahead estimate)
        self.totals = {"samples": 0, "reward_errors": 0, "stale_dropped": 0}
        self._ids: dict[int, list[int]] = {}
        self._tiles: dict[int, torch.Tensor] = {}  # prompt index → its images' tiles (prompts with images)
        self.t0 = None  # samples/s counts from the first batch drawn (after the initial evaluation)
        self.t_returned = None  # when the previous batch was handed to the loop (its training time follows)
        self.on_step = None  # called as on_step(step, stats) after each batch (the Ray learner's progress)
        self.progress = None
        if cfg.progress:
            from tqdm import tqdm

            self.progress = tqdm(total=cfg.max_steps, desc="rl", unit="step", dynamic_ncols=True)

    def __iter__(self):
        return self

    # --- pieces
    def _ids_of(self, i: int) -> list[int]:
        if i not in self._ids:
            self._ids[i], tiles = prompt_inputs(self.tokenizer, self.items[i], self.vision)
            if tiles is not None:
                self._tiles[i] = tiles
        return self._ids[i]

    def _draw(self, n: int, exclude: set[int]) -> list[int]:
        if self.cfg.uniform:
            free = [i for i in range(len(self.items)) if i not in exclude]
            return self.pool.rng.sample(free, min(n, len(free)))
        return self.pool.draw(n, exclude=exclude)

    def _submit(self, n: int, used: set[int] = frozenset()) -> int:
        """Send n prompts not already in flight or in this step's batch."""
        picked = self._draw(n, self.in_flight | used) if n > 0 else []
        for i in picked:
            self.in_flight.add(i)
            ids = self._ids_of(i)
            self.backend.submit(i, ids, self.cfg.group_size, pixel_values=self._tiles.get(i))
        return len(picked)

    def _score(self, r: Rollout) -> dict:
        item = self.items[r.prompt_index]
        comps = [c.text for c in r.completions]
        cols = {k: [item.get(k)] * len(comps) for k in ("answer", "verifier", "entry", "task", "id")}
        totals, per_fn, errors = score(self.reward_fns, self.reward_weights, [prompt_text(item)] * len(comps),
                                       comps, cols)
        r.rewards = totals
        passed = [v is not None and v >= 1.0 for v in per_fn.get("correctness", totals)]
        if not self.cfg.uniform:
            self.pool.update(r.prompt_index, passed)
        return {"per_fn": per_fn, "errors": errors}

    def publish(self) -> None:
        if self.published != self.step:
            state = {k: v.detach() for k, v in self.model.state_dict().items()}
            self.backend.publish(state, self.step)
            self.published = self.step

    # --- one batch
    def __next__(self) -> RLBatch:
        cfg, version = self.cfg, self.step
        t_start = time.perf_counter()
        self.t0 = self.t0 or t_start
        # the timeline of a step (seconds): the loop's forward/backward/update of the previous batch, the
        # weight publish, waiting on rollouts (the learner idle), scoring; workers' generation seconds
        timing = {"time/train_s": t_start - self.t_returned if self.t_returned is not None else 0.0,
                  "time/publish_s": 0.0, "time/wait_s": 0.0, "time/score_s": 0.0, "time/generate_s": 0.0}
        self.publish()
        timing["time/publish_s"] = time.perf_counter() - t_start
        kept, scored, per_fn_all = [], [], {k: [] for k in self.reward_fns}
        errors = zero_adv = stale_before = 0
        stale_before = self.buffer.dropped_stale
        rounds, used = 0, set()
        while len(kept) < cfg.prompts_per_step:
            need = cfg.prompts_per_step - len(kept) - self.backend.in_flight() - len(self.buffer)
            if need > 0 and rounds <= cfg.refill_rounds:
                self._submit(need, used)
                rounds += 1
            # past the refill rounds, still wait for the groups in flight: left behind, they would come
            # back one version late and, at --max-staleness 0, be dropped (an empty step every other step)
            if self.backend.in_flight() == 0 and len(self.buffer) == 0:
                break  # nothing eligible left
            t = time.perf_counter()
            for r in self.backend.ready():
                self.in_flight.discard(r.prompt_index)
                self.buffer.put(r, version)
            timing["time/wait_s"] += time.perf_counter() - t
            while len(kept) < cfg.prompts_per_step and (r := self.buffer.take(version)) is not None:
                used.add(r.prompt_index)
                t = time.perf_counter()
                info = self._score(r)
                timing["time/score_s"] += time.perf_counter() - t
                timing["time/generate_s"] += r.gen_s
                errors += info["errors"]
                for k, v in info["per_fn"].items():
                    per_fn_all[k] += [x for x in v if x is not None]
                valid = [x for x in r.rewards if x is not None]
                if len(valid) < 2:
                    continue
                scored.append(r)
                if max(valid) == min(valid):
                    zero_adv += 1  # nothing to learn from this group: dropped, the loop draws another
                    continue
                kept.append(r)
        if len(kept) < cfg.prompts_per_step:
            warnings.warn(f"rl step {version + 1}: only {len(kept)} of {cfg.prompts_per_step} groups carry a "
                          f"learning signal (prompt pool: {self.pool.describe()}); training on a smaller batch",
                          RuntimeWarning, stacklevel=2)
        # work ahead: the next step's groups generate while this one trains. As many as a step has been
        # taking (kept + zero-advantage: with a hard pool often twice prompts_per_step), not just
        # prompts_per_step: fewer leave the workers idle during the update and the learner waiting for
        # refills after it (the measured async loss); a group left over comes back at most one version old
        self.taken.append(len(scored))
        if cfg.max_staleness > 0:
            recent = self.taken[-3:]
            ahead = max(cfg.prompts_per_step, round(sum(recent) / len(recent)))
            self._submit(ahead - self.backend.in_flight() - len(self.buffer), used)

        # constant reward: nothing scored, or every scored group equal → count towards the stop
        self.constant_run = self.constant_run + 1 if not kept else 0
        if self.constant_run >= cfg.constant_steps:
            seen = sorted({x for r in scored for x in r.rewards if x is not None})
            raise ConstantRewardError(
                f"reward constant for {self.constant_run} consecutive steps (every group's completions scored "
                f"the same{': ' + ', '.join(f'{v:g}' for v in seen[:5]) if seen else ', or no prompt was eligible'}"
                f"; frac_reward_zero_std = 1): the GRPO loss is exactly 0, so training would do nothing. "
                f"Prompt pool: {self.pool.describe()}. Check the reward functions and the tasks' difficulty.")

        advs = []
        for r in kept:
            valid = torch.tensor([x for x in r.rewards if x is not None], dtype=torch.float32)
            advs.append(group_advantages(valid[None], cfg.scale_rewards)[0])
        stats = self._stats(version, kept, scored, per_fn_all, errors, zero_adv,
                            self.buffer.dropped_stale - stale_before)
        self.step += 1
        self._progress(stats)
        batch = collate(kept, advs, self.pad_id, stats, [self._tiles.get(r.prompt_index) for r in kept])
        self.t_returned = time.perf_counter()
        stats.update(timing, **{"time/step_s": self.t_returned - t_start + timing["time/train_s"]})
        return batch

    def _stats(self, version, kept, scored, per_fn_all, errors, zero_adv, stale) -> dict:
        rewards = [x for r in scored for x in r.rewards if x is not None]
        valid = [[x for x in r.rewards if x is not None] for r in scored]
        stds = [torch.tensor(v).std().item() for v in valid]
        comps = [c for r in kept for c in r.completions]
        n_samples = sum(len(r.completions) for r in scored)
        self.totals["samples"] += n_samples
        self.totals["reward_errors"] += errors
        self.totals["stale_dropped"] += stale
        lag = [version - r.version for r in kept]
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        stats = {"reward": mean(rewards), "reward_std": mean(stds),
                 # equal rewards, compared exactly: float32 std of [0.2] * 8 is ~1e-8, not 0
                 "frac_reward_zero_std": mean([float(max(v) == min(v)) for v in valid]) if valid else 1.0,
                 "completions/mean_length": mean([len(c.token_ids) for c in comps]),
                 "completions/clipped_ratio": mean([float(c.finish_reason == "length") for c in comps]),
                 **{f"rewards/{k}/mean": mean(v) for k, v in per_fn_all.items()},
                 "rewards/errors": float(errors), "groups/kept": float(len(kept)),
                 "groups/zero_adv_dropped": float(zero_adv), "samples/stale_dropped": float(stale),
                 "staleness/mean": mean(lag), "staleness/max": float(max(lag, default=0)),
                 "samples_per_s": self.totals["samples"] / max(time.perf_counter() - self.t0, 1e-9),
                 "workers/restarts": float(getattr(self.backend, "restarts", 0)),
                 **{f"pool/{k}": float(v) for k, v in self.pool.counts().items()}}
        return {k: (v if math.isfinite(v) else 0.0) for k, v in stats.items()}

    def _progress(self, stats: dict) -> None:
        if self.on_step is not None:
            self.on_step(self.step, stats)
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(reward=f"{stats['reward']:.3f}", samples_s=f"{stats['samples_per_s']:.1f}",
                                      staleness=f"{stats['staleness/mean']:.2f}", hard=int(stats["pool/hard"]))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.backend.close()

    def state_dict(self) -> dict:
        return {"step": self.step, "pool": self.pool.state_dict(), "constant_run": self.constant_run,
                "totals": dict(self.totals)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.constant_run = state["step"], state["constant_run"]
        self.pool.load_state_dict(state["pool"])
        self.totals.update(state["totals"])
        if self.progress is not None:
            self.progress.n = self.step
            self.progress.refresh()


# ----- held-out reward ----------------------------------------------------------------------------
def heldout_reward(items: list[dict], tokenizer, cfg: RLConfig):
    """An evaluation hook on the first `eval_prompts` held-out items, greedy replies: `eval/reward`
    (the training reward: the same functions and weights) and `eval/accuracy` (verifier pass rate)."""
    items = items[:cfg.eval_prompts]
    weights = parse_rewards(cfg.rewards)
    funcs = {k: REWARDS[k] for k in weights}

    def hook(model) -> dict:
        if not items:
            return {}
        from herd.inference import generate

        vision = model.config.vision
        inputs = [prompt_inputs(tokenizer, it, vision) for it in items]
        prompts = [ids for ids, _ in inputs]
        images = [tiles for _, tiles in inputs]
        outs = generate(model, prompts, max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                        pixel_values=images if any(t is not None for t in images) else None)
        eos = set(model.config.text.eos_token_ids)
        texts = [tokenizer.decode([t for t in o if t not in eos]) for o in outs]
        cols = {k: [it.get(k) for it in items] for k in ("answer", "verifier", "entry", "task", "id")}
        totals, _, _ = score(funcs, weights, [prompt_text(it) for it in items], texts, cols)
        passed = [s for s in REWARDS["correctness"](prompts=None, completions=texts, **cols) if s is not None]
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        return {"eval/reward": mean([t for t in totals if t is not None]), "eval/accuracy": mean(passed)}

    return hook


def plot_rl(metrics_path: Path, png: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    if not rows:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    for ax, keys, ylabel in [(axes[0], ["reward", "eval/reward"], "reward"),
                             (axes[1], ["eval/accuracy", "frac_reward_zero_std", "clip_ratio/region_mean"],
                              "fraction"),
                             (axes[2], ["mismatch_kl", "staleness/mean"], "KL / versions")]:
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            if pts:
                ax.plot(*zip(*pts), "o-" if k.startswith("eval") else "-", label=k, ms=3)
        ax.set_xlabel("learner step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title or "herd rl")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


# ----- the stage ----------------------------------------------------------------------------------
def train(cfg: RLConfig, backend_factory=None, on_step=None) -> dict:
    """Run (or resume) an RL run. backend_factory(cfg) → a rollout backend (default: one in-process
    worker, `LocalRollouts`); herd.train.rl.launch's learner actor passes Ray's. on_step(step, stats)
    is called after each batch is drawn. Returns the summary."""
    from herd.train import distributed
    from herd.train.loop import build_optimizer, init_from, run
    from herd.train.rl.actor import LocalRollouts, RolloutWorker

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = distributed.setup("cpu")
    torch.manual_seed(cfg.seed)
    model, tokenizer = init_from(cfg.init, env.device)
    train_items, val_items = load_items(cfg.tasks, cfg.per_task, cfg.seed)
    if backend_factory is None:
        def backend_factory(cfg):
            worker_model, _ = init_from(cfg.init)
            return LocalRollouts(RolloutWorker(worker_model, tokenizer, max_new_tokens=cfg.max_new_tokens,
                                               temperature=cfg.temperature, seed=cfg.seed))
    ref_model = init_from(cfg.init)[0].eval().requires_grad_(False) if cfg.beta > 0 else None
    pad = tokenizer.special_tokens.get("<|finetune_right_pad|>", tokenizer.special_tokens["<|eot|>"])
    check_vision(train_items + val_items, model.config.vision)
    source = RolloutSource(cfg, model, tokenizer, train_items, backend_factory(cfg), pad)
    source.on_step = on_step
    model, optimizer = build_optimizer(model, cfg, env, verbose=False)
    loop_cfg = dataclasses.replace(cfg, progress=False)  # the source draws the bar (reward, samples/s, staleness)
    summary = {"prompts": len(train_items), "heldout_prompts": min(len(val_items), cfg.eval_prompts)}
    heldout = heldout_reward(val_items, tokenizer, cfg)
    initial = Path(cfg.out) / "initial_eval.json"  # the starting model's held-out scores ("before RL")
    if not (cfg.resume and initial.exists()):
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        initial.write_text(json.dumps(heldout(model)) + "\n")
    summary.update({k.replace("eval/", "initial_eval/"): v for k, v in json.loads(initial.read_text()).items()})
    try:
        result = run(loop_cfg, model, optimizer, GRPOObjective(cfg, ref_model), source, env, tokenizer=tokenizer,
                     evals=[heldout], name="rl", summary=summary,
                     plot=lambda m, png: plot_rl(m, png.with_name("rl.png"), f"herd rl from {cfg.init}"))
    finally:
        source.close()
    result.update({"pool": source.pool.counts(), **{f"total_{k}": v for k, v in source.totals.items()}})
    (Path(cfg.out) / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
