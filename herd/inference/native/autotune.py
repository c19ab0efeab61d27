"""Per-CPU tuning of the native matrix-vector products, chosen by measuring, once (issue 19).

The bf16, w8a16 and w8a8 products in gemv.cpp are compiled in every combination of three knobs:

    rows      R ∈ {1, 2, 4, 8}  rows per inner loop (independent accumulator chains sharing x;
                                1 streams one row at a time, as ggml's dot products do)
    prefetch  P ∈ {0, 1, 2, 4}  software prefetch P groups of R rows ahead (0: hardware only)
    chunk     C ∈ {0, 64, 256}  0: one contiguous range of rows per thread; C: chunks of C rows dealt
                                round-robin, so the threads stream neighbouring memory together

and all 48 variants of a kernel give bit-identical results (each row is summed the same way). Which
one streams fastest depends on the CPU — the out-of-order window, how far its hardware prefetchers
look, whether 512-bit ops are native or double-pumped (the setting written for an Intel Xeon
reached ~62% of the read bandwidth on an AMD Zen 4) — so the setting is measured on the CPU, never
looked up in a table of CPU names:

  * when the kernels load, each product runs on a pool of 64 MiB of weights (bf16 [2048, 1024]
    or int8 [2048, 1024] matrices, as in the benchmark model; more than most CPUs' caches hold), the
    variants taking turns for 5 rounds, median GB/s per variant: first rows × prefetch with one
    range per thread (16 variants), then, on more than one thread, the winner's chunked splits (2
    more); about 1–1.5 s in all on an idle machine; a busy one cuts the rounds short past 2 s and
    stops measuring new variants past 6 s (the entry then says "complete": false);
  * the winner replaces the default (rows 4, prefetch 1, chunk 0: the pre-autotune kernel) only
    when it is at least 3% faster, so noise alone does not move the setting;
  * the result is cached in autotune.json beside the compiled library, keyed by the CPU's flags
    and the hash of gemv.cpp and of this file (any of them changing means tuning again) and by the
    thread count at load; a file that does not parse or does not match is ignored and rewritten,
    never an error;
  * HERD_NATIVE_AUTOTUNE=0 skips all of it and runs the defaults; HERD_NATIVE_AUTOTUNE=retune
    measures again whatever the cache holds, and rewrites it.

Timings on a busy machine choose badly: tune again on an idle one (HERD_NATIVE_AUTOTUNE=retune).
benchmarks/gemv.py prints every variant's rate and the chosen setting.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

KERNELS = ("bf16", "w8a16", "w8a8")
ROWS, PREFETCH, CHUNK = (1, 2, 4, 8), (0, 1, 2, 4), (0, 64, 256)
Setting = tuple[int, int, int]  # (rows, prefetch, chunk)
DEFAULT: Setting = (4, 1, 0)
VARIANTS: list[Setting] = list(itertools.product(ROWS, PREFETCH, CHUNK))
MARGIN = 0.03  # a variant must beat the default by this much to replace it
POOL_BYTES = 64 << 20
FILE = "autotune.json"


def name(setting: Setting) -> str:
    r, p, c = setting
    return f"rows {r}, prefetch {p}, " + ("one range per thread" if c == 0 else f"chunks of {c}")


def cache_key(cpu_flags: frozenset[str], source: bytes) -> str:
    """What a cached setting is valid for: this CPU's flags and this kernel source."""
    return hashlib.sha256(" ".join(sorted(cpu_flags)).encode() + b"\0" + source).hexdigest()[:16]


def _pool(kernel: str, pool_bytes: int):
    """(product, operands per matrix, bytes read per round) over a pool of weights of pool_bytes."""
    ops = torch.ops.herd_native
    K, N = 1024, 2048
    g = torch.Generator().manual_seed(0)
    if kernel == "bf16":
        n = max(1, pool_bytes // (N * K * 2))
        w = torch.full((n * N, K), 0.5, dtype=torch.bfloat16)  # written, so the pages are really there
        x = torch.randn(K, generator=g).bfloat16()
        return ops.bf16_gemv, [(m, x) for m in w.split(N)], w.numel() * 2
    n = max(1, pool_bytes // (N * K))
    q = torch.full((n * N, K), 3, dtype=torch.int8)
    s, x = torch.full((N,), 0.01), torch.randn(K, generator=g).bfloat16()
    return getattr(ops, f"{kernel}_gemv"), [(m, s, x) for m in q.split(N)], q.numel()


def measure(kernel: str, settings: list[Setting], pool_bytes: int = POOL_BYTES, repeat: int = 5,
            deadline: float = float("inf"), stop: float = float("inf")) -> dict[Setting, float]:
    """Median GB/s of each setting of one kernel over the pool, the settings taking turns for
    `repeat` rounds, or fewer (at least one) once time.perf_counter() passes `deadline`; past
    `stop` the settings not yet measured at all are left out (the first one always runs)."""
    fn, mats, nbytes = _pool(kernel, pool_bytes)
    times: dict[Setting, list[float]] = {st: [] for st in settings}
    for st in settings:  # warm-up: pages touched, code paged in
        fn(*mats[0], list(st))
    for i in range(repeat):
        if i > 0 and time.perf_counter() > deadline:
            break
        for j, st in enumerate(settings):
            if i == 0 and j > 0 and time.perf_counter() > stop:
                break
            t = time.perf_counter()
            for args in mats:
                fn(*args, list(st))
            times[st].append(time.perf_counter() - t)
    return {st: nbytes / statistics.median(ts) / 1e9 for st, ts in times.items() if ts}


def tune(kernels: tuple[str, ...] = KERNELS, pool_bytes: int = POOL_BYTES, repeat: int = 5,
         budget_s: float = 2.0) -> dict:
    """Measure and choose each kernel's setting → {"settings": {kernel: [r, p, c]}, "gbps": {kernel:
    {variant name: GB/s}}, "seconds": wall time, "complete": every variant measured}. An idle
    machine finishes in about 1–1.5 s; a busy one cuts each stage's rounds short (at least one) past
    budget_s, and past 3 × budget_s stops measuring new variants (the default is measured first)."""
    t0 = time.perf_counter()
    stop = t0 + 3 * budget_s
    settings, rates, complete = {}, {}, True
    stage1 = [DEFAULT] + [(r, p, 0) for r in ROWS for p in PREFETCH if (r, p, 0) != DEFAULT]
    for k in kernels:
        start, share = time.perf_counter(), budget_s / len(kernels)
        got = measure(k, stage1, pool_bytes, repeat, start + 0.7 * share, stop)
        complete &= len(got) == len(stage1)
        best = max(got, key=got.get)
        if torch.get_num_threads() > 1:  # with one thread every split is the same loop
            split = [best] + [(best[0], best[1], c) for c in CHUNK[1:]]
            if time.perf_counter() < stop:
                got.update(measure(k, split, pool_bytes, repeat, start + share, stop))
            complete &= all(st in got for st in split)
        best = max(got, key=got.get)
        settings[k] = list(best if got[best] > got[DEFAULT] * (1 + MARGIN) else DEFAULT)
        rates[k] = {name(st): round(v, 2) for st, v in got.items()}
    return {"settings": settings, "gbps": rates, "seconds": round(time.perf_counter() - t0, 2),
            "complete": complete}


def _read(path: Path, key: str, threads: int, kernels: tuple[str, ...]) -> dict | None:
    """The cached entry for (key, threads), or None when missing, unreadable or for another key."""
    try:
        data = json.loads(path.read_text())
        entry = data["threads"][str(threads)] if data["key"] == key else None
        if entry is None or any(tuple(entry["settings"][k]) not in VARIANTS for k in kernels):
            return None
        return entry
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write(path: Path, key: str, threads: int, entry: dict) -> None:
    """Add (threads → entry) under key, dropping entries for another key; atomic (temp + rename)."""
    try:
        data = json.loads(path.read_text())
        if not (isinstance(data, dict) and data.get("key") == key and isinstance(data.get("threads"), dict)):
            data = None
    except (OSError, ValueError):
        data = None
    data = data or {"key": key, "threads": {}}
    data["threads"][str(threads)] = entry
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_or_tune(path: Path, key: str, threads: int, kernels: tuple[str, ...] = KERNELS,
                 run: Callable[[tuple[str, ...]], dict] = tune, force: bool = False) -> dict:
    """The settings for these kernels on `threads` threads: from the cache file when it holds them
    for this key (and not `force`), else measured by run(kernels) and written there (a cache that
    cannot be written is not an error: the settings still apply to this process). Returns the entry
    plus "source" ("cache" or "tuned") and "threads"."""
    entry = None if force else _read(path, key, threads, kernels)
    if entry is not None:
        return {**entry, "source": "cache", "threads": threads}
    entry = run(kernels)
    try:
        _write(path, key, threads, entry)
    except OSError:
        pass
    return {**entry, "source": "tuned", "threads": threads}


def apply(settings: dict[str, list[int]]) -> None:
    """Make these the settings of the default products (torch.ops.herd_native.*_gemv without tuning=)."""
    for k, st in settings.items():
        torch.ops.herd_native.set_gemv_tuning(k, list(st))


def defaults(kernels: tuple[str, ...] = KERNELS, why: str = "default") -> dict:
    return {"settings": {k: list(DEFAULT) for k in kernels}, "source": why, "threads": torch.get_num_threads()}
