"""The guard hook: what the server asks of a safety pipeline (`herd serve --guards CONFIG`).

The server calls a guard object at two points and exposes a third:

    verdict = guards.check_input(messages)           # before generation; blocked → refusal, no tokens
    verdict = guards.check_output(messages, reply)   # after generation; blocked → reply replaced
    body    = guards.moderate(["text", ...])         # POST /v1/moderations, OpenAI's response shape

A verdict needs `decision` ("allow" | "warn" | "block"), `guard`, `categories` ([(code, name)]),
`reason` and `to_dict()` — the shape of `herd.safety.Verdict`. The pipeline itself (Llama Guard,
Prompt Guard, Code Shield, configured from one file) lives in herd.safety and never imports
FastAPI; `load_guards` builds it from the config path once, at startup.
"""

from __future__ import annotations

from typing import Any, Protocol


class GuardHook(Protocol):
    def check_input(self, messages: list[dict]) -> Any: ...

    def check_output(self, messages: list[dict], reply: str) -> Any: ...

    def moderate(self, inputs: list[str]) -> dict: ...


def refusal_text(verdict) -> str:
    """What a refused turn says: the guard and the categories it found, never a bare "no"."""
    cats = ", ".join(f"{c} {n}" for c, n in (verdict.categories or []))
    return f"I can't help with that. (blocked by {verdict.guard}" + (f": {cats}" if cats else "") + ")"


def load_guards(path: str) -> GuardHook:
    """The safety pipeline configured by the file at `path` (herd.safety)."""
    try:
        import herd.safety as safety
    except ImportError as e:
        raise ValueError(f"--guards needs herd.safety, which is not available here ({e})") from None
    for name in ("load_server_guards", "load_pipeline"):
        factory = getattr(safety, name, None)
        if factory is not None:
            return factory(path)
    raise ValueError("herd.safety has no pipeline loader (load_pipeline) yet; run without --guards")
