"""One verdict type for every guard, the hazard taxonomy, and how verdicts combine.

Every guard in herd.safety (Llama Guard, Prompt Guard, Code Shield) has one method,

    guard.scan(input) -> Verdict(decision, guard, categories, score, reason, status, latency_ms)

after PurpleLlama's LlamaFirewall (`scanners/base_scanner.py`: `scan(message) -> ScanResult(decision,
reason, score, status)`). herd's additions: the guard's name, the hazard categories as codes *and*
names, and the latency, so a log line or a refusal can say who decided what and why.

    decision   allow | warn | block        block wins when verdicts are combined (combine)
    status     ok | error | parse_error   error: the guard raised (model missing, scanner crash);
                                           parse_error: the guard answered something unreadable
    categories [("S1", "Violent Crimes"), ...]   Llama Guard's codes; other guards use their own
    score      a probability in [0, 1] of "unsafe" / "malicious" / None when the guard has none

Errors are never silent. A guard that raises gives a verdict with status "error" whose decision
follows its `on_error` policy: "closed" blocks (the default: a broken guard must not let
traffic through), "open" allows (upstream Code Shield's behaviour, kept as an explicit choice).
A Llama Guard answer that is neither `safe` nor `unsafe` + valid codes always blocks: the guard
ran and did not say safe.

Taxonomy: the 14 hazard categories of Llama Guard 4 with the names of its model card
(PurpleLlama `Llama-Guard4/12B/MODEL_CARD.md`; MLCommons hazards + S14 for tool use).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

Decision = Literal["allow", "warn", "block"]
Status = Literal["ok", "error", "parse_error"]
ErrorPolicy = Literal["open", "closed"]

# Llama Guard 4 model card names (the names a refusal or a moderation response shows).
CATEGORY_NAMES: dict[str, str] = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons",
    "S10": "Hate",
    "S11": "Suicide & Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}

_RANK = {"allow": 0, "warn": 1, "block": 2}


@dataclass
class Verdict:
    """What one guard decided about one input (see the module docstring)."""

    decision: Decision
    guard: str
    categories: list[tuple[str, str]] = field(default_factory=list)
    score: float | None = None
    reason: str = ""
    status: Status = "ok"
    latency_ms: float = 0.0
    details: dict = field(default_factory=dict)  # guard-specific: raw output, issues found, window scores

    @property
    def blocked(self) -> bool:
        return self.decision == "block"

    @property
    def codes(self) -> list[str]:
        return [c for c, _ in self.categories]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["categories"] = [{"code": c, "name": n} for c, n in self.categories]
        return d


def check_policy(on_error: str) -> ErrorPolicy:
    if on_error not in ("open", "closed"):
        raise ValueError(f"on_error must be 'open' or 'closed', got {on_error!r}")
    return on_error  # type: ignore[return-value]


def error_verdict(guard: str, exc: BaseException, on_error: ErrorPolicy, latency_ms: float = 0.0) -> Verdict:
    """The verdict of a guard that raised: blocked when failing closed, allowed when failing open."""
    decision: Decision = "block" if on_error == "closed" else "allow"
    msg = f"{type(exc).__name__}: {exc}"
    return Verdict(decision, guard, reason=f"guard error (fail-{on_error}): {msg}", status="error",
                   latency_ms=latency_ms, details={"error": msg})


def guarded(guard: str, on_error: ErrorPolicy, fn: Callable[[], Verdict]) -> Verdict:
    """Run one scan: time it, and turn an exception into an error verdict under the policy."""
    t0 = time.perf_counter()
    try:
        v = fn()
    except Exception as exc:  # noqa: BLE001 - every failure becomes an explicit verdict
        return error_verdict(guard, exc, on_error, (time.perf_counter() - t0) * 1e3)
    v.latency_ms = (time.perf_counter() - t0) * 1e3
    return v


def combine(verdicts: list[Verdict], guard: str = "pipeline") -> Verdict:
    """One verdict from several: the strictest decision wins (block > warn > allow). Its guard names
    the deciding guards ("llama_guard", "llama_guard+code_shield"; `guard` when all allow), its
    categories are the union in order, its score the maximum, its reason the deciding reasons,
    its latency the sum; details["verdicts"] keeps every verdict."""
    if not verdicts:
        return Verdict("allow", guard, reason="no guard ran")
    top = max(_RANK[v.decision] for v in verdicts)
    deciding = [v for v in verdicts if _RANK[v.decision] == top]
    cats: list[tuple[str, str]] = []
    for v in verdicts:
        for c in v.categories:
            if c not in cats:
                cats.append(c)
    scores = [v.score for v in verdicts if v.score is not None]
    status: Status = "ok" if all(v.status == "ok" for v in verdicts) else "error"
    name = "+".join(dict.fromkeys(v.guard for v in deciding)) if top else guard
    return Verdict(deciding[0].decision, name, cats, max(scores) if scores else None,
                   "; ".join(f"{v.guard}: {v.reason}" for v in deciding if v.reason), status,
                   sum(v.latency_ms for v in verdicts), {"verdicts": [v.to_dict() for v in verdicts]})


def refusal_text(verdict: Verdict) -> str:
    """What a refused turn says: the guard and the categories it found, never a bare "no"."""
    cats = ", ".join(f"{c} {n}" for c, n in verdict.categories)
    return f"I can't help with that. (blocked by {verdict.guard}" + (f": {cats}" if cats else "") + ")"


def check_text(text, what: str = "text") -> str:
    """A non-empty str that encodes as UTF-8. bytes are decoded strictly; anything else is a ValueError."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what} is not valid UTF-8 (byte {e.start}: {bytes(text)[e.start:e.start + 1]!r})") from None
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid UTF-8 (unpaired surrogate at character {e.start})") from None
    if not text.strip():
        raise ValueError(f"{what} is empty")
    return text
