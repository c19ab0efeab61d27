"""A tiny Llama Guard: a guard4-shaped herd model trained to answer in Llama Guard 4's verdict format.

    herd guard train-llama --out runs/tiny-guard        (≈ 35 min + 4 min evaluation on one busy core)
    herd guard train-llama --from-base runs/speedrun/base --out runs/tiny-guard-pruned

What it learns: given Llama Guard 4's exact prompt (herd.safety.llama_guard.render_prompt, default
S1–S14 categories, wrapped in the Llama 4 chat format), answer `safe` or `unsafe\\nS<k>` then
<|eot|>, for the last user turn (prompt classification) or the last agent turn (response
classification). It is trained from scratch — herd has no pre-trained base at this size — so it
learns the task, not language: a measure of the recipe and the plumbing (prompt → model →
parser → verdict → metrics), not a substitute for the 12B model.

Two starts. From scratch (the default) — below. Or `--from-base DIR`, as Meta made Llama Guard 4
from Llama 4 Scout: a pre-trained herd MoE (a Hugging Face directory such as the speedrun's base)
pruned to its shared experts (herd.model.prune: routers and routed experts dropped, each MoE
layer's shared expert kept as its dense MLP; the vision tower dropped, this guard reads text
only), then fine-tuned with the same recipe; the base's tokenizer becomes the guard's and the
base's attention (RoPE/NoPE layers, chunking) is kept. BENCHMARKS.md compares the two.

Model from scratch: the guard4 preset's shape (dense SwiGLU in every layer, full attention, RoPE everywhere;
no routed experts) at hidden 128, 4 layers, 4 heads / 1 KV head, vocabulary 2,048 (a byte-level
BPE trained here on the training texts; Llama 4 specials at the top), text only.

Data (herd.data.safety_data, category maps documented there): unsafe prompts from Do-Not-Answer,
HarmBench and AdvBench, one S-code each; safe prompts from chatterbot-corpus and S-Labs' benign
questions. Response classification: benign chatterbot (prompt, reply) pairs → safe; an unsafe
prompt answered by a refusal → safe; an unsafe prompt answered by a compliance opening → unsafe
with the prompt's code. The compliance replies are synthetic ("Sure, here is how to <behaviour>:
Step 1."), in the style of AdvBench's target strings — the bundled data has no harmful replies.
Held-out split by source item (crc32 of the item id, 20 % test): a prompt and every example built
from it fall on the same side.

Training goes through the shared loop (herd.train.loop.run: schedule, AdamW with MetaP,
clipping, metrics.jsonl, crash-safe checkpoints, resume, final Hugging Face export) with one
objective: next-token cross-entropy on the verdict tokens only (the prompt is masked with -100).

Learning the category, not only the verdict. The first recipe (plain sampling, every verdict token
weighted 1) learned safe/unsafe but answered S7 — the largest class, 29 % of the unsafe training
examples — for almost every unsafe prompt: of `unsafe`, `\n`, `S`, `7`, `<|eot|>` only the first and
the code carry information, so the code is one token in ~3.5 of the average verdict, and the prior
is the cheapest way to lower it. Two standard remedies, both on by default:
  * class-balanced sampling (`balance_power`): each unsafe training example of category c is
    repeated round((n_max / n_c) ** p) times, n_c = unsafe training examples with code c (p = 0.5,
    "square-root" re-sampling; p = 0 turns it off); safe examples are left as they are.
  * the category token(s) weighted in the loss (`code_weight`): a labelled position whose target
    is not a format token (`safe`, `unsafe`, the newline, `S`, `<|eot|>`) is a code token and counts
    `code_weight` times; the loss is divided by the labelled-token count as before.
Measured (BENCHMARKS.md): these did not make the codes learnable at this compute. 120 more steps
with both, continuing the 400-step model (`--init`), left the teacher-forced code accuracy on
held-out unsafe prompts at 0.378 (majority class S7: 0.375), and the code token's loss sits at the
entropy of the category prior from the start: the model learns safe/unsafe from cues and never
reads the prompt's topic. The data does carry the categories — a TF-IDF logistic regression on
the same split names 78 % of them — and so does the model: a linear probe on the state that
predicts the code names 0.51 of them at random initialisation (0.61 for the pruned base with
global attention) but 0.26 after the scratch recipe, which erases what it does not read. The
message-dependent part of that state is ~4 % of its norm, and a head trained alone on it needs
thousands of full-batch steps (benchmarks/guard_categories.py, BENCHMARKS.md): the category is an
optimisation (conditioning) problem at this compute, not a capacity or labelling one.
`--head-only-steps` (LP-FT: the head first, the body frozen) is there for longer runs; unmeasured.

Evaluation runs the saved directory through LlamaGuard.from_pretrained → scan (generation, the
strict parser, the unsafe score) on the test split and writes OUT/guard_eval.json and a table
in the shape of the Llama Guard 4 model card's (recall, false-positive rate, F1), per category
for prompt classification plus overall rows for prompts and responses, and AUC of the score.
"""

from __future__ import annotations

import copy
import json
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from herd.safety.llama_guard import guard_messages
from herd.train.loop import LoopConfig

REFUSALS = ["I can't help with that.", "I'm sorry, but I can't assist with that request.",
            "I won't provide that. Is there something else I can help with?"]
TEST_SHARE = 0.2


@dataclass
class GuardTrainConfig(LoopConfig):
    out: str = field(default="runs/tiny-guard", metadata={"help": "run directory"})
    max_steps: int = field(default=400, metadata={"help": "optimizer steps"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    warmup: int = field(default=20, metadata={"help": "linear warm-up steps"})
    batch_size: int = field(default=16, metadata={"help": "examples per micro-batch"})
    benign_prompts: int = field(default=2400, metadata={"help": "safe prompts sampled from the benign pool"})
    vocab_size: int = field(default=2048, metadata={"help": "trained BPE vocabulary (specials included)"})
    hidden: int = field(default=128, metadata={"help": "model width"})
    layers: int = field(default=4, metadata={"help": "decoder layers"})
    balance: str = field(default="none", metadata={"help": "dense model: no MoE balancing"})
    eval_every: int = field(default=100, metadata={"help": "validation loss every N steps"})
    ckpt_every: int = field(default=100, metadata={"help": "checkpoint every N steps"})
    eval_limit: int | None = field(default=None, metadata={"help": "scan only the first N held-out examples"})
    balance_power: float = field(default=0.5, metadata={"help": "repeat unsafe examples of category c "
                                                         "round((n_max/n_c)**p) times (0: no re-sampling)"})
    code_weight: float = field(default=4.0, metadata={"help": "loss weight of the category-code token(s)"})
    init: str | None = field(default=None, metadata={"help": "continue from this tiny-guard directory's weights "
                                                     "and tokenizer (a fresh schedule and optimizer)"})
    from_base: str | None = field(default=None, metadata={"help": "start from this pre-trained herd model "
                                                          "directory, pruned to its shared experts (its tokenizer)"})
    head_only_steps: int = field(default=0, metadata={"help": "train only the LM head for the first N steps, the "
                                                      "rest frozen, then everything (LP-FT, Kumar et al. 2022)"})
    global_attention: bool = field(default=True, metadata={"help": "--from-base: attend over the whole prompt on "
                                                          "every layer (Llama Guard 4's attention_chunk_size null) "
                                                          "instead of the base's chunks"})


def split_of(item_id: str) -> str:
    return "test" if zlib.crc32(item_id.encode()) % 1000 < TEST_SHARE * 1000 else "train"


def build_examples(benign_prompts: int = 2400, seed: int = 0) -> dict[str, list[dict]]:
    """{"train": [...], "test": [...]}: {"messages", "target", "code" (None = safe), "kind": "prompt"|"response",
    "source", "id"}; see the module docstring."""
    from herd.data.safety_data import benign_conversations, benign_prompts as benign_pool, harmful_prompts

    rng = random.Random(seed)
    out: dict[str, list[dict]] = {"train": [], "test": []}

    def add(item_id, source, messages, code, kind):
        out[split_of(item_id)].append({"id": item_id, "source": source, "messages": messages, "code": code,
                                       "kind": kind, "target": "safe" if code is None else f"unsafe\n{code}"})

    for h in harmful_prompts():
        user = {"role": "user", "content": h["text"]}
        add(h["id"], h["source"], [user], h["code"], "prompt")
        r = rng.random()
        if r < 1 / 3:
            behaviour = h["text"].rstrip(".?! ")
            reply = f"Sure, here is how to {behaviour[0].lower() + behaviour[1:]}: Step 1."
            add(h["id"], h["source"], [user, {"role": "assistant", "content": reply}], h["code"], "response")
        elif r < 2 / 3:
            add(h["id"], h["source"], [user, {"role": "assistant", "content": rng.choice(REFUSALS)}], None, "response")
    pool = benign_pool()
    for b in rng.sample(pool, min(benign_prompts, len(pool))):
        add(b["id"], b["source"], [{"role": "user", "content": b["text"]}], None, "prompt")
    convs = benign_conversations()
    for c in rng.sample(convs, min(len(convs), benign_prompts // 4)):
        add(c["id"], "chatterbot", [{"role": "user", "content": c["prompt"]},
                                    {"role": "assistant", "content": c["reply"]}], None, "response")
    for k in out:
        rng.shuffle(out[k])
    return out


def balanced(examples: list[dict], power: float) -> list[dict]:
    """Class-balanced re-sampling: unsafe examples of category c repeated round((n_max / n_c) ** power) times."""
    counts: dict[str, int] = {}
    for e in examples:
        if e["code"] is not None:
            counts[e["code"]] = counts.get(e["code"], 0) + 1
    if not counts or power == 0:
        return list(examples)
    n_max = max(counts.values())
    return [e for e in examples
            for _ in range(1 if e["code"] is None else max(1, round((n_max / counts[e["code"]]) ** power)))]


def format_token_ids(tok) -> set[int]:
    """Verdict tokens that carry no category: those of `safe`, `unsafe\nS` and <|eot|>."""
    return {*tok.encode("safe"), *tok.encode("unsafe\nS"), tok.special_tokens["<|eot|>"]}


def model_config(vocab: int, hidden: int, layers: int):
    """The guard4 preset's shape at CPU size (text only)."""
    from herd.config import ModelConfig
    from herd.presets import NUM_SMALL_SPECIALS, SPECIAL_OFFSETS, get_config

    tc = copy.deepcopy(get_config("guard4").text)
    base = vocab - NUM_SMALL_SPECIALS
    heads = max(1, hidden // 32)
    tc.vocab_size, tc.hidden_size, tc.num_hidden_layers = vocab, hidden, layers
    tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim = heads, 1, hidden // heads
    tc.intermediate_size, tc.intermediate_size_mlp = hidden, 4 * hidden
    tc.no_rope_layers, tc.moe_layers, tc.layer_types = [1] * layers, [], None
    tc.max_position_embeddings, tc.rope_scaling = 4096, None
    tc.bos_token_id = base + SPECIAL_OFFSETS["begin_of_text"]
    tc.eos_token_id = [base + SPECIAL_OFFSETS["end_of_text"], base + SPECIAL_OFFSETS["eom"], base + 8]
    tc.source_keys = None
    return ModelConfig(text=tc, vision=None, tie_word_embeddings=False, name="tiny-guard")


def pruned_base(directory, device="cpu", global_attention: bool = True):
    """The guard's starting point, made as Llama Guard 4 was made from Scout: a pre-trained herd
    model (a Hugging Face directory) with every MoE layer pruned to its shared expert and the
    vision tower dropped (this guard reads text only). The base's RoPE/NoPE layers are kept.

    global_attention: the chunked RoPE layers attend over the whole prompt, as Llama Guard 4's
    published config has it (attention_chunk_size null; herd's guard4 preset). Why it matters at
    this size: the speedrun base has 256-position chunks and the guard prompt is ~330 of its
    tokens, the message at ~215–250 and the verdict at ~320 — in the next chunk, so three of the
    four layers at the verdict position could not see the message (BENCHMARKS.md). Within the
    first chunk the function is unchanged. False keeps the base's chunks."""
    from herd.model.llama4 import build_model
    from herd.model.prune import prune_to_shared_expert
    from herd.train.loop import init_from

    try:
        base = init_from(directory, device)[0]
    except ValueError as e:
        raise ValueError(str(e).replace("--init", "--from-base")) from None
    dense = prune_to_shared_expert(base, text_only=True)
    if not global_attention or dense.config.text.attention_chunk_size is None:
        return dense
    config = copy.deepcopy(dense.config)
    config.text.attention_chunk_size = None
    if config.text.layer_types is not None:
        config.text.layer_types = ["full_attention" if t == "chunked_attention" else t
                                   for t in config.text.layer_types]
    model = build_model(config, dtype=next(dense.parameters()).dtype, device=device, init=False)
    model.load_state_dict(dense.state_dict(), strict=True)
    return model


def encode_example(tok, ex: dict) -> tuple[list[int], int]:
    """(ids of prompt + verdict + <|eot|>, index of the first verdict token)."""
    from herd.chat import encode_messages

    prompt, _ = encode_messages(tok, guard_messages(ex["messages"]), add_generation_prompt=True)
    return prompt + tok.encode(ex["target"]) + [tok.special_tokens["<|eot|>"]], len(prompt)


class GuardBatches:
    """Endless shuffled epochs of encoded examples (herd.train.loop.BatchSource): right-padded rows,
    labels only on the verdict and its <|eot|>."""

    def __init__(self, encoded: list[tuple[list[int], int]], batch_size: int, pad_id: int, seed: int = 0):
        self.encoded, self.batch_size, self.pad_id, self.seed = encoded, batch_size, pad_id, seed
        self.epoch, self.pos = 0, 0
        self._order()

    def _order(self):
        self.order = list(range(len(self.encoded)))
        random.Random(f"{self.seed}/{self.epoch}").shuffle(self.order)

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos + self.batch_size > len(self.order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order()
        rows = [self.encoded[i] for i in self.order[self.pos:self.pos + self.batch_size]]
        self.pos += self.batch_size
        return collate(rows, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order()


def collate(rows, pad_id: int):
    from herd.data.packing import Batch

    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -100, dtype=torch.long)
    for r, (ids, start) in enumerate(rows):
        t = torch.tensor(ids)
        x[r, :len(ids) - 1] = t[:-1]
        y[r, start - 1:len(ids) - 1] = t[start:]  # predict the verdict tokens and <|eot|>
    return Batch(input_ids=x, labels=y, pixel_values=None, n_tokens=int((y != -100).sum()))


class VerdictLoss:
    """Summed cross-entropy over the labelled (verdict) positions (herd.train.loop.Objective);
    positions whose target is not in `format_ids` (the category code) count `code_weight` times."""

    def __init__(self, device, format_ids: set[int] = frozenset(), code_weight: float = 1.0):
        self.device, self.code_weight = device, code_weight
        self.format_ids = torch.tensor(sorted(format_ids), dtype=torch.long)

    def tokens(self, batch) -> int:
        return int((batch.labels != -100).sum())

    def __call__(self, model, batch):
        labels = batch.labels.to(self.device)
        mask = labels != -100  # [B, T]
        target = labels[mask]  # [N] the verdict tokens
        weight = torch.ones(target.shape, dtype=torch.float32, device=self.device)
        if self.code_weight != 1.0:
            is_code = ~torch.isin(target, self.format_ids.to(self.device))
            weight = torch.where(is_code, torch.full_like(weight, self.code_weight), weight)

        def head(h, w):  # h [B, T, H] normed hidden states, w [V, H]: the head only where there is a label
            logits = (h[mask] @ w.t()).float()  # [N, V]
            return (torch.nn.functional.cross_entropy(logits, target, reduction="none") * weight).sum()

        return model(batch.input_ids.to(self.device), apply_head=head), self.tokens(batch), {}


def train(cfg: GuardTrainConfig) -> dict:
    from herd.model.llama4 import build_model
    from herd.tokenizer import load_tokenizer
    from herd.tokenizer_train import train_tokenizer
    from herd.train import distributed
    from herd.train.loop import Phase, build_optimizer, run, validation_loss

    cfg.validate()
    if not 0 <= cfg.head_only_steps < cfg.max_steps:
        raise ValueError(f"--head-only-steps must be in [0, --max-steps={cfg.max_steps}), got {cfg.head_only_steps}")
    if cfg.init and cfg.from_base:
        raise ValueError("--init and --from-base both name the starting weights: give one")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = build_examples(cfg.benign_prompts, cfg.seed)
    tok_dir = Path(cfg.init or cfg.from_base or out / "tokenizer")
    if not (tok_dir / "tokenizer.json").exists():
        from herd.safety.llama_guard import render_text

        corpus = [render_text(ex["messages"]) + "\n" + ex["target"] for ex in data["train"]]
        train_tokenizer(corpus, cfg.vocab_size, tok_dir)
    tok = load_tokenizer(str(tok_dir))
    env = distributed.setup()
    torch.manual_seed(cfg.seed)
    if cfg.init:
        from herd.train.loop import init_from

        model = init_from(cfg.init, env.device)[0]
    elif cfg.from_base:
        model = pruned_base(cfg.from_base, env.device, cfg.global_attention)
    else:
        model = build_model(model_config(cfg.vocab_size, cfg.hidden, cfg.layers)).to(env.device)
        model.init_weights()
    train_enc = [encode_example(tok, ex) for ex in data["train"]]
    test_enc = [encode_example(tok, ex) for ex in data["test"]]
    pad = tok.special_tokens["<|finetune_right_pad|>"] if "<|finetune_right_pad|>" in tok.special_tokens else 0
    sampled = balanced(data["train"], cfg.balance_power)
    enc_of = {id(ex): enc for ex, enc in zip(data["train"], train_enc)}
    source = GuardBatches([enc_of[id(ex)] for ex in sampled], cfg.batch_size, pad, cfg.seed)
    val = [collate(test_enc[i:i + cfg.batch_size], pad) for i in range(0, min(len(test_enc), 8 * cfg.batch_size),
                                                                          cfg.batch_size)]
    objective = VerdictLoss(env.device, format_token_ids(tok), cfg.code_weight)
    model, optimizer = build_optimizer(model, cfg, env, verbose=False)
    counts = {k: {"examples": len(v), "unsafe": sum(e["code"] is not None for e in v)} for k, v in data.items()}
    counts["train_sampled"] = {"examples": len(sampled), "unsafe": sum(e["code"] is not None for e in sampled)}
    phases = []
    if cfg.head_only_steps:  # linear probing first: the body stays as it was, the head learns to read it
        frozen = [p for n, p in model.named_parameters() if not n.endswith("lm_head.weight")]
        if len(frozen) == len(list(model.parameters())):
            raise ValueError("--head-only-steps needs an LM head of its own (this model ties it to the embeddings)")
        phases = [Phase("head-only", source, 0, cfg.head_only_steps, frozen)]
    summary = run(cfg, model, optimizer, objective, source, env, tokenizer=tok, phases=phases,
                  evals=[validation_loss(objective, val, env, cfg)], name="guard",
                  summary={"data": counts, "prompt_tokens_mean": sum(s for _, s in train_enc) / len(train_enc)})
    distributed.teardown(env)
    if env.is_main:
        summary["eval"] = evaluate(out, data["test"], cfg.eval_limit)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def evaluate(model_dir, examples: list[dict], limit: int | None = None) -> dict:
    """Scan each held-out example through LlamaGuard.from_pretrained(model_dir); write guard_eval.json."""
    from tqdm import tqdm

    from herd.safety.llama_guard import LlamaGuard
    from herd.safety.metrics import auc, binary_report, per_class_report
    from herd.safety.verdict import CATEGORY_NAMES

    guard = LlamaGuard.from_pretrained(model_dir, dtype=torch.float32)
    rows = []
    for ex in tqdm(examples[:limit], desc="eval", unit="ex"):
        v = guard.scan(ex["messages"])
        rows.append({"id": ex["id"], "kind": ex["kind"], "code": ex["code"], "decision": v.decision,
                     "status": v.status, "codes": v.codes, "score": v.score})
    report: dict = {"n": len(rows), "parse_errors": sum(r["status"] == "parse_error" for r in rows),
                    "errors": sum(r["status"] == "error" for r in rows)}
    for kind in ("prompt", "response"):
        rs = [r for r in rows if r["kind"] == kind]
        y = [r["code"] is not None for r in rs]
        pred = [r["decision"] == "block" for r in rs]
        rep = binary_report(pred, y)
        rep["auc"] = auc([r["score"] for r in rs], y) if any(y) and not all(y) else None
        rep["n"], rep["n_unsafe"] = len(rs), sum(y)
        report[kind] = rep
    prompts = [r for r in rows if r["kind"] == "prompt"]
    benign = [r for r in prompts if r["code"] is None]
    per = {}
    for code in CATEGORY_NAMES:
        pos = [r for r in prompts if r["code"] == code]
        if not pos:
            continue
        rs = pos + benign
        rep = binary_report([r["decision"] == "block" for r in rs], [r["code"] is not None for r in rs])
        rep["code_recall"] = sum(code in r["codes"] for r in pos) / len(pos)
        rep["n"] = len(pos)
        per[code] = rep
    report["per_category"] = per
    # naming the category, as a classifier of S-codes over every held-out prompt (a safe prompt whose
    # verdict names S7 is a false S7; a blocked prompt naming no code names nothing)
    report["per_code"] = per_class_report([r["codes"] for r in prompts], [r["code"] for r in prompts],
                                          sorted({r["code"] for r in prompts if r["code"]}, key=lambda c: int(c[1:])))
    report["table"] = model_card_table(report)
    (Path(model_dir) / "guard_eval.json").write_text(json.dumps({"report": report, "rows": rows}, indent=1))
    return report


def model_card_table(report: dict) -> str:
    """Markdown in the Llama Guard 4 card's shape: rows of Recall / False Positive Rate / F1."""
    from herd.safety.verdict import CATEGORY_NAMES

    lines = ["| set | n unsafe | Recall | False Positive Rate | F1 | category named |", "|---|---|---|---|---|---|"]
    for code, r in report["per_category"].items():
        lines.append(f"| prompt {code} {CATEGORY_NAMES[code]} | {r['n']} | {r['recall']:.2f} | {r['fpr']:.2f} | "
                     f"{r['f1']:.2f} | {r['code_recall']:.2f} |")
    for kind in ("prompt", "response"):
        r = report[kind]
        lines.append(f"| **all {kind}s** | {r['n_unsafe']} | {r['recall']:.2f} | {r['fpr']:.2f} | {r['f1']:.2f} | |")
    return "\n".join(lines)


def category_table(per_code: dict, bow: dict | None = None, verdict_f1: float | None = None) -> str:
    """Markdown: per S-code precision / recall / F1 with support for the guard (report["per_code"]),
    and beside it the bag-of-words baseline's (bag_of_words_categories()["per_code"]) if given."""
    from herd.safety.verdict import CATEGORY_NAMES

    def f(x):
        return "–" if x != x else f"{x:.2f}"  # nan: the code was never named

    head = "| code | support | guard precision | guard recall | guard F1 |"
    rule = "|---|---:|---:|---:|---:|"
    if bow:
        head, rule = head + " BoW precision | BoW recall | BoW F1 |", rule + "---:|---:|---:|"
    lines = [head, rule]
    for code in CATEGORY_NAMES:
        r = per_code.get(code)
        if r is None or not r["support"]:
            lines.append(f"| {code} {CATEGORY_NAMES[code]} | 0 | no data | | |" + (" | | |" if bow else ""))
            continue
        row = (f"| {code} {CATEGORY_NAMES[code]} | {r['support']} | {f(r['precision'])} | {f(r['recall'])} | "
               f"{f(r['f1'])} |")
        if bow:
            b = bow["per_code"][code]
            row += f" {f(b['precision'])} | {f(b['recall'])} | {f(b['f1'])} |"
        lines.append(row)
    if verdict_f1 is not None:
        lines.append(f"| safe/unsafe verdict (all prompts) | | | | {verdict_f1:.2f} |" + (" | | |" if bow else ""))
    return "\n".join(lines)


def category_accuracy(model_dir, examples: list[dict]) -> dict:
    """Teacher-forced category accuracy on unsafe examples: after prompt + `unsafe\nS`, the code
    S1–S14 whose token(s) the model gives the highest log-probability (does it read the topic?)."""
    from collections import Counter

    from herd.model.weights import load_model
    from herd.safety.verdict import CATEGORY_NAMES
    from herd.tokenizer import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = load_model(model_dir, dtype=torch.float32).eval()
    head = tok.encode("unsafe\nS")
    codes = list(CATEGORY_NAMES)
    tails = []
    for c in codes:
        ids = tok.encode("unsafe\n" + c)
        if ids[:len(head)] != head:
            raise ValueError(f"{model_dir}: 'unsafe\\n{c}' does not start with the tokens of 'unsafe\\nS'")
        tails.append(ids[len(head):])
    unsafe = [e for e in examples if e["code"] is not None]
    pred = []
    with torch.no_grad():
        for e in unsafe:
            ids, start = encode_example(tok, e)
            prefix = ids[:start + len(head)]
            rows = [prefix + t for t in tails]  # one row per code
            x = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)  # [14, T], right-padded
            for r, row in enumerate(rows):
                x[r, :len(row)] = torch.tensor(row)
            logp = torch.log_softmax(model(x).float(), -1)  # [14, T, V]
            score = [sum(float(logp[r, len(prefix) - 1 + k, t]) for k, t in enumerate(tail))
                     for r, tail in enumerate(tails)]
            pred.append(codes[max(range(len(codes)), key=score.__getitem__)])
    y = [e["code"] for e in unsafe]
    return {"n": len(y), "accuracy": sum(p == t for p, t in zip(pred, y)) / len(y),
            "majority_class": Counter(y).most_common(1)[0][1] / len(y), "predicted": dict(Counter(pred))}


def bag_of_words_categories(data: dict[str, list[dict]], kind: str = "prompt") -> dict:
    """How much the data says about the category: TF-IDF word uni/bigrams + logistic regression
    (scikit-learn, class-balanced) trained on the unsafe training items, scored on the test items."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from herd.safety.metrics import per_class_report

    tr = [e for e in data["train"] if e["kind"] == kind and e["code"] is not None]
    te = [e for e in data["test"] if e["kind"] == kind and e["code"] is not None]
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    x = vec.fit_transform([e["messages"][-1]["content"] for e in tr])
    clf = LogisticRegression(C=10, max_iter=3000, class_weight="balanced").fit(x, [e["code"] for e in tr])
    pred = clf.predict(vec.transform([e["messages"][-1]["content"] for e in te]))
    y = [e["code"] for e in te]
    per = {c: sum(p == c for p, t in zip(pred, y) if t == c) / sum(t == c for t in y) for c in sorted(set(y))}
    per_code = per_class_report([{p} for p in pred], y, sorted(set(y) | set(pred), key=lambda c: int(c[1:])))
    return {"n": len(y), "accuracy": sum(p == t for p, t in zip(pred, y)) / len(y), "recall": per,
            "per_code": per_code}
