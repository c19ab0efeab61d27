"""Lazy attribute loading for package __init__ files: names import their module on first use,
so `import herd` and `herd --help` stay fast."""

from __future__ import annotations

import importlib


def lazy_getattr(package: str, table: dict[str, tuple[str, str]], namespace: dict):
    """A module-level __getattr__ resolving `name` to getattr(import_module(module), attr)."""

    def __getattr__(name: str):
        if name in table:
            module, attr = table[name]
            value = getattr(importlib.import_module(module), attr)
            namespace[name] = value  # cache: the next access skips __getattr__
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
