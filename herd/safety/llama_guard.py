"""Llama Guard 4: the prompt, the verdict parser, the unsafe score, and the guard around a model.

Llama Guard is a Llama 4 model (the `guard4` preset: Scout with the routed experts pruned, 12B
dense) that reads one conversation and answers `safe`, or `unsafe` and a line of category codes.
herd runs it like any Llama 4 checkpoint (`herd.load_model(dir)`); this file adds what makes it
a guard:

render_prompt(messages, categories=None, excluded=()) -> list of parts   (pure)
    The text of the one user turn the guard reads, in llama-stack's published template
    (`llama_stack/providers/inline/safety/llama_guard/llama_guard.py`: PROMPT_TASK,
    SAFETY_CATEGORIES, PROMPT_CONVERSATION, PROMPT_INSTRUCTIONS):

        Task: Check if there is unsafe content in '{Agent}' messages in conversations according our safety policy with the below categories.

        <BEGIN UNSAFE CONTENT CATEGORIES>
        S1: Violent Crimes.
        ...
        <END UNSAFE CONTENT CATEGORIES>

        <BEGIN CONVERSATION>

        User: ...

        Agent: ...

        <END CONVERSATION>

        Provide your safety assessment for ONLY THE LAST {Agent} message in the above conversation:
         - First line must read 'safe' or 'unsafe'.
         - If unsafe, a second line must include a comma-separated list of violated categories.

    {Agent} is the role of the last message: `User` classifies a prompt (the conversation must
    then end with the user turn), `Agent` a reply. Turns are labelled `User:` / `Agent:` as in
    Meta's Hugging Face chat template for Llama Guard 4 (llama-stack's current code writes the
    capitalised role, "Assistant"). Category lines use the template's short names ("S3: Sex
    Crimes.", PROMPT_CATEGORY_NAMES); verdicts report the model card's names (CATEGORY_NAMES).
    Meta's template defaults to S1–S14 for text and drops S14 (Code Interpreter Abuse, "text
    only") when any image is present; `categories` replaces the default list, `excluded` drops
    codes from it. An image is placed in the turn it belongs to, before that turn's text
    ("you need to add the image token to the turn in which the image occurs", Llama Guard 4
    prompt-format page). Roles must alternate user / assistant starting with user, as the HF
    template requires. The parts go into the Llama 4 chat format (herd.chat.encode_messages) as
    one user message followed by the assistant header.

parse_verdict(text, valid_codes) -> (safe, codes)   (pure)
    Surrounding whitespace is ignored (guards that emit "\\n\\nunsafe\\nS1" parse). Accepted:
    exactly `safe`, or `unsafe` then one line of comma-separated codes from `valid_codes`.
    Anything else (prose, "safe to proceed", unknown codes, `unsafe` without codes) raises
    VerdictParseError, which the guard turns into a *blocking* parse_error verdict — never safe.

unsafe_score(logits, tokenizer) -> P(first verdict token = first token of "unsafe")
    From the logits at the first generated position (softmax over the vocabulary), for
    thresholds and precision-recall curves (PurpleLlama#7 asks for exactly this).

LlamaGuard(model, tokenizer).scan(messages) -> Verdict
    One forward for the score, then greedy decoding of the verdict (a few tokens; each step runs
    the model on the whole sequence, no KV cache: verdicts are ≤ 8 tokens). With `threshold` set,
    the score decides (unsafe iff score ≥ threshold) and the generated codes name the categories.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from herd.safety.verdict import CATEGORY_NAMES, ErrorPolicy, Verdict, check_policy, check_text, guarded

# The category text in the prompt: llama-stack's names (= Meta's HF template defaults).
PROMPT_CATEGORY_NAMES: dict[str, str] = {
    "S1": "Violent Crimes", "S2": "Non-Violent Crimes", "S3": "Sex Crimes", "S4": "Child Exploitation",
    "S5": "Defamation", "S6": "Specialized Advice", "S7": "Privacy", "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons", "S10": "Hate", "S11": "Self-Harm", "S12": "Sexual Content",
    "S13": "Elections", "S14": "Code Interpreter Abuse",
}
TEXT_ONLY_CODES = ("S14",)  # dropped from the default list when an image is present

_CODE = re.compile(r"^S[1-9][0-9]*$")
ROLE_LABELS = {"user": "User", "assistant": "Agent"}

TASK = ("Task: Check if there is unsafe content in '{agent}' messages in conversations according our safety "
        "policy with the below categories.")
INSTRUCTIONS = ("Provide your safety assessment for ONLY THE LAST {agent} message in the above conversation:\n"
                " - First line must read 'safe' or 'unsafe'.\n"
                " - If unsafe, a second line must include a comma-separated list of violated categories.")


class VerdictParseError(ValueError):
    """The guard's output is not `safe` or `unsafe` + a line of valid category codes."""


# ----------------------------------------------------------------------------- prompt


def policy_categories(categories: dict[str, str] | None = None, excluded=(), has_image: bool = False) -> dict[str, str]:
    """The category block's {code: text}: the default list (without S14 when an image is present)
    or `categories`, minus `excluded`. Codes must look like S<n>; excluded codes must exist."""
    if categories is None:
        cats = {c: n for c, n in PROMPT_CATEGORY_NAMES.items() if not (has_image and c in TEXT_ONLY_CODES)}
    else:
        if not isinstance(categories, dict) or not categories:
            raise ValueError("categories must be a non-empty {code: description} dict")
        cats = dict(categories)
    for code, text in cats.items():
        if not isinstance(code, str) or not _CODE.match(code):
            raise ValueError(f"category code {code!r} is not of the form S<number> (S1, S2, ...)")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"category {code} needs a non-empty description")
    excluded = list(excluded or ())
    known = set(cats) | set(PROMPT_CATEGORY_NAMES)
    unknown = [c for c in excluded if c not in known]
    if unknown:
        raise ValueError(f"unknown category code(s) to exclude: {', '.join(map(str, unknown))} "
                         f"(known: {', '.join(cats)})")
    cats = {c: n for c, n in cats.items() if c not in excluded}
    if not cats:
        raise ValueError("every category is excluded: the guard would have nothing to check")
    return cats


def _category_line(code: str, text: str) -> str:
    text = text.strip()
    return f"{code}: {text}" if text.endswith(".") else f"{code}: {text}."


def _turn_parts(message: dict, index: int) -> tuple[str, list]:
    """(role label, [str | image part]) of one message, images first then text."""
    if not isinstance(message, dict) or "role" not in message:
        raise ValueError(f"message {index} must be a dict with 'role' and 'content'")
    role = message["role"]
    if role not in ROLE_LABELS:
        raise ValueError(f"message {index} has role {role!r}: Llama Guard reads user and assistant turns only "
                         "(scan tool outputs with Prompt Guard; pass the system prompt separately)")
    want = "user" if index % 2 == 0 else "assistant"
    if role != want:
        raise ValueError(f"conversation roles must alternate user/assistant/user/... starting with user; "
                         f"message {index} is {role!r}")
    content = message.get("content")
    parts = [content] if isinstance(content, (str, bytes)) else list(content or [])
    texts, images = [], []
    for p in parts:
        if isinstance(p, (str, bytes)):
            texts.append(check_text(p, f"message {index}"))
        elif isinstance(p, dict) and p.get("type") in ("text", "input_text"):
            texts.append(check_text(p.get("text"), f"message {index}"))
        elif isinstance(p, dict) and p.get("type") in ("image", "image_url", "input_image"):
            images.append(p)
        else:
            raise ValueError(f"message {index}: unknown content part {p!r}")
    text = " ".join(t.strip() for t in texts)
    if not text and not images:
        raise ValueError(f"message {index} is empty")
    return ROLE_LABELS[role], images + ([text] if text else [])


def render_prompt(messages: list[dict], categories: dict[str, str] | None = None, excluded=()) -> list:
    """The guard's user turn as parts: strs and the conversation's image parts in their turns.
    Join the strs (images dropped) for the text; see the module docstring for the layout."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("the conversation to classify is empty")
    turns = [_turn_parts(m, i) for i, m in enumerate(messages)]
    has_image = any(not isinstance(p, str) for _, parts in turns for p in parts)
    cats = policy_categories(categories, excluded, has_image)
    agent = turns[-1][0]
    out: list = [TASK.format(agent=agent) + "\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n"
                 + "\n".join(_category_line(c, n) for c, n in cats.items())
                 + "\n<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n"]
    for i, (label, parts) in enumerate(turns):
        out[-1] += ("\n\n" if i else "") + f"{label}: "
        for p in parts:
            if isinstance(p, str):
                out[-1] += p
            else:
                out += [p, ""]
    out[-1] += "\n\n<END CONVERSATION>\n\n" + INSTRUCTIONS.format(agent=agent)
    return [p for p in out if not (isinstance(p, str) and p == "")]


def render_text(messages: list[dict], categories: dict[str, str] | None = None, excluded=()) -> str:
    """render_prompt's text (image parts left out)."""
    return "".join(p for p in render_prompt(messages, categories, excluded) if isinstance(p, str))


def guard_messages(messages: list[dict], categories=None, excluded=()) -> list[dict]:
    """The one-message dialog to encode with herd.chat.encode_messages (add_generation_prompt=True)."""
    parts = render_prompt(messages, categories, excluded)
    return [{"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}]


# ----------------------------------------------------------------------------- output


def parse_verdict(text: str, valid_codes) -> tuple[bool, list[str]]:
    """`safe` → (True, []); `unsafe\\nS1,S10` → (False, ["S1", "S10"]); else VerdictParseError."""
    if not isinstance(text, str):
        raise VerdictParseError(f"guard output must be text, got {type(text).__name__}")
    lines = text.strip().split("\n")
    if lines == ["safe"]:
        return True, []
    if len(lines) != 2 or lines[0].strip() != "unsafe":
        raise VerdictParseError(f"not a verdict (expected 'safe' or 'unsafe' + a line of codes): {text!r}")
    codes = [c.strip() for c in lines[1].split(",")]
    valid = set(valid_codes)
    bad = [c for c in codes if c not in valid]
    if bad or not codes:
        raise VerdictParseError(f"unknown category code(s) {', '.join(repr(c) for c in bad)} in {text!r} "
                                f"(valid: {', '.join(sorted(valid, key=lambda c: int(c[1:])))})")
    return False, list(dict.fromkeys(codes))


def verdict_token_ids(tokenizer) -> tuple[int, int]:
    """(first token of "safe", first token of "unsafe"): the two answers' first tokens must differ."""
    safe, unsafe = tokenizer.encode("safe")[0], tokenizer.encode("unsafe")[0]
    if safe == unsafe:
        raise ValueError("this tokenizer starts 'safe' and 'unsafe' with the same token; no score can be read")
    return safe, unsafe


def unsafe_score(logits: torch.Tensor, unsafe_id: int) -> float:
    """P(first verdict token = unsafe) from the first generated position's logits [vocab]."""
    return float(torch.softmax(logits.double(), dim=-1)[unsafe_id])


# ----------------------------------------------------------------------------- the guard


class LlamaGuard:
    """A Llama Guard model as a guard: scan(messages) → Verdict (see the module docstring).

    model, tokenizer: a herd Llama 4 (any size; the real one is `herd.load_model(LG4 dir)`) and its
    tokenizer. categories / excluded: the policy (default S1–S14, S14 dropped with images).
    threshold: None = the generated verdict decides; a float = block iff score ≥ threshold.
    on_error: what an exception (a bad image, a model failure) decides: "closed" blocks.
    """

    name = "llama_guard"

    def __init__(self, model, tokenizer, *, categories: dict[str, str] | None = None, excluded=(),
                 threshold: float | None = None, on_error: ErrorPolicy = "closed", max_new_tokens: int = 8,
                 max_prompt_tokens: int | None = None):
        self.model, self.tok = model.eval(), tokenizer
        self.categories, self.excluded = categories, tuple(excluded)
        policy_categories(categories, excluded)  # validate now, not at the first scan
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold, self.on_error = threshold, check_policy(on_error)
        self.max_new_tokens = max_new_tokens
        self.safe_id, self.unsafe_id = verdict_token_ids(tokenizer)
        ctx = model.config.text.max_position_embeddings
        self.max_prompt_tokens = max_prompt_tokens or ctx
        self.stop_ids = {tokenizer.special_tokens[t] for t in ("<|eot|>", "<|eom|>", "<|end_of_text|>")
                         if t in tokenizer.special_tokens}

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.bfloat16, **kw) -> "LlamaGuard":
        """A Llama Guard Hugging Face directory (config.json, safetensors, tokenizer.json) → guard."""
        from herd.model.weights import load_model
        from herd.tokenizer import load_tokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a model directory (no config.json); Llama Guard weights are never downloaded")
        return cls(load_model(path, dtype=dtype), load_tokenizer(str(path)), **kw)

    def _inputs(self, messages):
        from herd.chat import encode_messages

        ids, tiles = encode_messages(self.tok, guard_messages(messages, self.categories, self.excluded),
                                     add_generation_prompt=True, vision_config=self.model.config.vision)
        if len(ids) > self.max_prompt_tokens:
            raise ValueError(f"the guard prompt is {len(ids)} tokens, beyond the guard's window of "
                             f"{self.max_prompt_tokens}: classify a shorter conversation")
        pv = torch.cat(tiles).to(self.model.dtype) if tiles else None
        return ids, pv

    @torch.no_grad()
    def classify(self, messages: list[dict]) -> tuple[str, float]:
        """(generated verdict text, unsafe score). Raises on bad input."""
        ids, pv = self._inputs(messages)
        x = torch.tensor([ids], device=self.model.device)
        logits = self.model(x, pixel_values=pv)[0, -1].float()
        score = unsafe_score(logits, self.unsafe_id)
        out: list[int] = []
        for _ in range(self.max_new_tokens):
            t = int(logits.argmax())
            if t in self.stop_ids:
                break
            out.append(t)
            x = torch.cat([x, torch.tensor([[t]], device=x.device)], dim=1)
            logits = self.model(x, pixel_values=pv)[0, -1].float()
        return self.tok.decode(out), score

    def scan(self, messages) -> Verdict:
        """Classify the last turn of `messages` (a str = one user turn)."""
        if isinstance(messages, (str, bytes)):
            messages = [{"role": "user", "content": messages}]
        return guarded(self.name, self.on_error, lambda: self._scan(messages))

    def _scan(self, messages) -> Verdict:
        has_image = any(isinstance(p, dict) and p.get("type") in ("image", "image_url", "input_image")
                        for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
                        for p in m["content"])
        valid = policy_categories(self.categories, self.excluded, has_image)
        text, score = self.classify(messages)
        names = {c: CATEGORY_NAMES.get(c, n.rstrip(".")) if self.categories is None else n.rstrip(".")
                 for c, n in valid.items()}
        try:
            safe, codes = parse_verdict(text, valid)
        except VerdictParseError as e:
            return Verdict("block", self.name, score=score, reason=f"unreadable guard output, blocked: {e}",
                           status="parse_error", details={"output": text})
        if self.threshold is not None:
            safe = score < self.threshold
        cats = [(c, names[c]) for c in codes]
        if safe:
            return Verdict("allow", self.name, score=score, reason="safe", details={"output": text})
        reason = ("unsafe: " + ", ".join(f"{c} {n}" for c, n in cats)) if cats else \
            f"unsafe: score {score:.3f} ≥ threshold {self.threshold}"
        return Verdict("block", self.name, cats, score, reason, details={"output": text})
