"""herd's OpenAI-compatible server and web chat UI (`herd serve MODEL`).

    from herd.serve import Settings, create_app
    app = create_app(Settings(model_name="tiny"), herd.Engine(model, tokenizer=tok, max_seq_len=2048))

Files: protocol.py (request/response models), errors.py (one error shape, one status table),
worker.py (the engine thread), app.py (routes), tools.py (Llama 4 tool calls), metrics.py
(Prometheus), guards.py (the safety hook), ui.html (the chat page), cli.py (`herd serve`).
"""

from herd._lazy import lazy_getattr

_LAZY = {
    "Settings": ("herd.serve.app", "Settings"),
    "create_app": ("herd.serve.app", "create_app"),
    "add_serve_subcommand": ("herd.serve.cli", "add_serve_subcommand"),
}

__getattr__ = lazy_getattr(__name__, _LAZY, globals())
__all__ = list(_LAZY)
