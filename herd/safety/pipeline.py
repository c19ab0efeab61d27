"""One safety pipeline around the model, configured in one place.

    input shields   Prompt Guard on the last user message and on tool outputs since it
                    (indirect injection); Llama Guard on the conversation ending at the user turn
    model           whatever generates the reply (Pipeline.respond takes a function)
    output shields  Llama Guard on the conversation + the agent's reply; Code Shield on the
                    reply's fenced code blocks

    pipe = load_pipeline("guards.json")              # herd serve --guards guards.json reads the same
    v = pipe.check_input(messages)                    # Verdict; v.blocked → refuse with refusal_text(v)
    v = pipe.check_output(messages, reply)
    reply, verdicts = pipe.respond(messages, generate)   # the whole order, refusal text included
    body = pipe.moderate(["text", ...])               # OpenAI /v1/moderations response

GuardConfig (a dataclass; a JSON file with the same keys; relative paths are read from the file's
folder) names every guard's weights by path —
nothing is downloaded, every guard is built once, at construction — and the policy: categories,
excluded codes, thresholds, fail-open / fail-closed. Code Shield runs semgrep on model output, so
it is off unless switched on (anything that runs tools is opt-in). An example guards.json:

    {"llama_guard": "runs/tiny-guard", "prompt_guard": "runs/prompt-guard", "code_shield": true,
     "excluded": ["S6"], "llama_guard_threshold": null, "on_error": "closed"}

Guards run in a fixed order
and all of them run (so the verdict lists everything found); block wins (herd.safety.verdict.combine).

Llama Guard sees user and assistant turns only: system prompts are dropped, tool outputs go to
Prompt Guard, an assistant message that only calls tools is dropped, and consecutive turns of
one role are joined, so the conversation alternates as Llama Guard's template requires.

/v1/moderations (OpenAI's shape): one result per input, each input classified as a user prompt.
`categories` has every Llama Guard 4 category name (the model card's) plus "prompt_injection"
and "insecure_code"; `category_scores` gives, for the categories Llama Guard named, its unsafe
score (P(first verdict token = unsafe) — Llama Guard has one score, not one per category) and
0 for the others; Prompt Guard's score for prompt_injection. herd's extras: `guard`, `verdicts`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from herd.safety.verdict import CATEGORY_NAMES, Verdict, check_policy, combine, refusal_text


@dataclass
class GuardConfig:
    """Which guards run and how; JSON keys are the field names (see the module docstring)."""

    llama_guard: str | None = field(default=None, metadata={"help": "Llama Guard model directory (HF layout)"})
    llama_guard_input: bool = field(default=True, metadata={"help": "classify the user turn before generation"})
    llama_guard_output: bool = field(default=True, metadata={"help": "classify the agent turn after generation"})
    categories: dict[str, str] | None = field(default=None, metadata={"help": "custom {code: description}"})
    excluded: list[str] = field(default_factory=list, metadata={"help": "category codes not to check"})
    llama_guard_threshold: float | None = field(default=None, metadata={
        "help": "block iff P(unsafe) ≥ this (default: the generated verdict decides)"})
    dtype: str = field(default="bfloat16", metadata={"help": "Llama Guard weights dtype"})
    prompt_guard: str | None = field(default=None, metadata={"help": "Prompt Guard directory (herd-trained or HF)"})
    prompt_guard_threshold: float | None = field(default=None, metadata={"help": "override the model's threshold"})
    prompt_guard_tools: bool = field(default=True, metadata={"help": "also scan tool outputs (indirect injection)"})
    code_shield: bool = field(default=False, metadata={"help": "scan fenced code in replies (runs semgrep)"})
    code_shield_warn_blocks: bool = field(default=False, metadata={"help": "treat Code Shield WARN as block"})
    on_error: str = field(default="closed", metadata={"help": "a guard that fails: 'closed' blocks, 'open' allows"})

    @classmethod
    def from_json(cls, path) -> "GuardConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"guard config {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"guard config {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"guard config {path} must hold a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"guard config {path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        cfg = cls(**data)
        base = path.parent
        for key in ("llama_guard", "prompt_guard"):  # relative paths are relative to the config file
            v = getattr(cfg, key)
            if v and not Path(v).is_absolute() and not Path(v).exists() and (base / v).exists():
                setattr(cfg, key, str(base / v))
        cfg.validate()
        return cfg

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def validate(self) -> None:
        check_policy(self.on_error)
        if not (self.llama_guard or self.prompt_guard or self.code_shield):
            raise ValueError("the guard config enables no guard: set llama_guard, prompt_guard or code_shield")
        for key in ("llama_guard_threshold", "prompt_guard_threshold"):
            v = getattr(self, key)
            if v is not None and not 0 <= v <= 1:
                raise ValueError(f"{key} must be in [0, 1], got {v}")
        if self.categories is not None or self.excluded:
            from herd.safety.llama_guard import policy_categories

            policy_categories(self.categories, self.excluded)


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def guard_conversation(messages: list[dict]) -> list[dict]:
    """The user/assistant turns Llama Guard reads (see the module docstring); starts with a user turn."""
    out: list[dict] = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"a message must be a dict with 'role' and 'content', got {m!r}")
        role = m["role"]
        if role not in ("user", "assistant"):
            continue
        content = m.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in ("image", "image_url") for p in content):
            parts = list(content)
        else:
            text = _text(content)
            if not text.strip():
                continue
            parts = [{"type": "text", "text": text}]
        if out and out[-1]["role"] == role:
            out[-1]["content"] += parts
        elif out or role == "user":
            out.append({"role": role, "content": parts})
    if not out:
        raise ValueError("the conversation has no user message to classify")
    return out


class Pipeline:
    """The configured guards, built once (see the module docstring)."""

    def __init__(self, config: GuardConfig | None = None, *, llama_guard=None, prompt_guard=None, code_shield=None):
        self.config = config = config or GuardConfig(code_shield=code_shield is not None)
        if config.llama_guard and llama_guard is None:
            from herd.inference.loading import parse_dtype
            from herd.safety.llama_guard import LlamaGuard

            llama_guard = LlamaGuard.from_pretrained(config.llama_guard, dtype=parse_dtype(config.dtype),
                                                     categories=config.categories, excluded=config.excluded,
                                                     threshold=config.llama_guard_threshold, on_error=config.on_error)
        if config.prompt_guard and prompt_guard is None:
            from herd.safety.prompt_guard import load_prompt_guard

            prompt_guard = load_prompt_guard(config.prompt_guard, on_error=config.on_error,
                                             **({"threshold": config.prompt_guard_threshold}
                                                if config.prompt_guard_threshold is not None else {}))
        if config.code_shield and code_shield is None:
            from herd.safety.code_shield import CodeShield

            code_shield = CodeShield(on_error=config.on_error, warn_blocks=config.code_shield_warn_blocks)
        self.llama_guard, self.prompt_guard, self.code_shield = llama_guard, prompt_guard, code_shield

    # ----- the two checkpoints -------------------------------------------------------------------
    def input_verdicts(self, messages: list[dict]) -> list[Verdict]:
        conv = guard_conversation(messages)
        out = []
        if self.prompt_guard is not None:
            last_user = max(i for i, m in enumerate(messages) if m.get("role") == "user")
            out.append(self.prompt_guard.scan(_text(messages[last_user].get("content"))))
            if self.config.prompt_guard_tools:
                for m in messages[last_user + 1:]:
                    if m.get("role") in ("tool", "ipython"):
                        v = self.prompt_guard.scan(_text(m.get("content")))
                        v.reason = f"tool output: {v.reason}"
                        out.append(v)
        if self.llama_guard is not None and self.config.llama_guard_input:
            if conv[-1]["role"] != "user":  # a tool-call round trip: classify up to the last user turn
                conv = conv[:-1]
            out.append(self.llama_guard.scan(conv))
        return out

    def output_verdicts(self, messages: list[dict], reply: str) -> list[Verdict]:
        out = []
        if self.llama_guard is not None and self.config.llama_guard_output:
            conv = guard_conversation(list(messages) + [{"role": "assistant", "content": reply}])
            out.append(self.llama_guard.scan(conv))
        if self.code_shield is not None:
            out.append(self.code_shield.scan(reply))
        return out

    def check_input(self, messages: list[dict]) -> Verdict:
        """Before generation: block → refuse with refusal_text(verdict), generate nothing. A
        conversation the guards cannot read (no user turn, bad roles) is blocked, saying why."""
        try:
            return combine(self.input_verdicts(messages))
        except ValueError as e:
            return Verdict("block", "pipeline", reason=f"unreadable conversation, blocked: {e}", status="error")

    def check_output(self, messages: list[dict], reply: str) -> Verdict:
        """After generation: block → replace the reply with refusal_text(verdict)."""
        try:
            return combine(self.output_verdicts(messages, reply))
        except ValueError as e:
            return Verdict("block", "pipeline", reason=f"unreadable conversation, blocked: {e}", status="error")

    def respond(self, messages: list[dict], generate: Callable[[list[dict]], str]) -> tuple[str, list[Verdict]]:
        """Input shields → generate(messages) → output shields. Returns (reply or refusal, verdicts)."""
        v_in = self.check_input(messages)
        if v_in.blocked:
            return refusal_text(v_in), [v_in]
        reply = generate(messages)
        v_out = self.check_output(messages, reply)
        return (refusal_text(v_out) if v_out.blocked else reply), [v_in, v_out]

    # ----- OpenAI /v1/moderations ----------------------------------------------------------------
    def moderate(self, inputs: list[str], model: str = "herd-guards") -> dict:
        if isinstance(inputs, str):
            inputs = [inputs]
        if not inputs:
            raise ValueError("input must be a non-empty string or list of strings")
        return {"id": f"modr-{uuid.uuid4().hex}", "model": model,
                "results": [moderation_result(self.input_verdicts([{"role": "user", "content": t}]))
                            if isinstance(t, str) and t.strip() else _bad_input_result(t) for t in inputs]}


MODERATION_CATEGORIES = [*CATEGORY_NAMES.values(), "prompt_injection", "insecure_code"]


def moderation_result(verdicts: list[Verdict]) -> dict:
    """One /v1/moderations result from the verdicts on one input (module docstring)."""
    v = combine(verdicts)
    flags = dict.fromkeys(MODERATION_CATEGORIES, False)
    scores = dict.fromkeys(MODERATION_CATEGORIES, 0.0)
    for u in verdicts:
        if u.guard == "prompt_guard":
            scores["prompt_injection"] = max(scores["prompt_injection"], u.score or 0.0)
            flags["prompt_injection"] |= u.blocked
        elif u.guard == "code_shield":
            flags["insecure_code"] |= u.decision != "allow"
            scores["insecure_code"] = max(scores["insecure_code"], 1.0 if u.decision != "allow" else 0.0)
        elif u.guard == "llama_guard":
            for code, name in u.categories:
                key = CATEGORY_NAMES.get(code, name)
                flags[key] = True
                scores[key] = max(scores.get(key, 0.0), u.score or 0.0)
    return {"flagged": v.blocked, "categories": flags, "category_scores": scores,
            "category_applied_input_types": {k: (["text"] if flags[k] else []) for k in flags},
            "guard": v.guard, "reason": v.reason, "verdicts": [u.to_dict() for u in verdicts]}


def _bad_input_result(t) -> dict:
    v = Verdict("block", "pipeline", reason=f"input must be a non-empty string, got {t!r:.40}", status="error")
    return moderation_result([v]) | {"flagged": True}


def load_pipeline(path) -> Pipeline:
    """The pipeline a JSON guard config describes (`herd serve --guards CONFIG`)."""
    return Pipeline(GuardConfig.from_json(path))
