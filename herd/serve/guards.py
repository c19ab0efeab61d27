"""The guard hook: what the server asks of a safety pipeline (`herd serve --guards CONFIG`).

The server calls a guard object at two points and exposes a third:

    verdict = guards.check_input(messages)           # before generation; blocked → refusal, no tokens
    verdict = guards.check_output(messages, reply)   # after generation; blocked → reply replaced
    body    = guards.moderate(["text", ...])         # POST /v1/moderations, OpenAI's response shape

A verdict needs `decision` ("allow" | "warn" | "block"), `guard`, `categories` ([(code, name)]),
`reason` and `to_dict()` — the shape of `herd.safety.Verdict`. The pipeline itself (Llama Guard,
Prompt Guard, Code Shield, configured from one JSON file: herd.safety.GuardConfig) is
`herd.safety.Pipeline`, which never imports FastAPI; `load_guards` builds it once, at startup.
The server gives guards text only: image parts are replaced by "[image]".
"""

from __future__ import annotations

from typing import Any, Protocol

from herd.safety.verdict import refusal_text  # noqa: F401  (what a refused turn says; one source)


class GuardHook(Protocol):
    def check_input(self, messages: list[dict]) -> Any: ...

    def check_output(self, messages: list[dict], reply: str) -> Any: ...

    def moderate(self, inputs: list[str]) -> dict: ...


def load_guards(path: str) -> GuardHook:
    """The safety pipeline configured by the JSON file at `path` (herd.safety.load_pipeline): every
    guard is built here, once, from weights on given paths. A bad config is a ValueError."""
    from herd.safety import load_pipeline

    return load_pipeline(path)
