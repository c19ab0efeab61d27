"""Shared benchmark helpers: timing, the machine's matmul ceiling, peers built on identical weights.

Every benchmark prints a ratio against a named peer measured in the same run; absolute times on a
shared 2-core machine mean little.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install


def setup_threads() -> int:
    n = int(os.environ.get("HERD_THREADS", min(2, os.cpu_count() or 1)))
    torch.set_num_threads(n)
    return n


def bench(fn, warmup: int = 1, repeat: int = 5, min_time: float = 0.0) -> float:
    """Best-of-`repeat` wall time of fn() in seconds (after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_ceiling(dtype: torch.dtype, n: int = 2048) -> float:
    """Achievable dense matmul GFLOP/s on this machine for `dtype` (best of a few n×n×n products)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    t = bench(lambda: a @ b, warmup=2, repeat=5)
    return 2 * n**3 / t / 1e9


def load_average() -> str:
    """The 1, 5 and 15-minute load averages, printed beside every timing (a busy machine skews them)."""
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def cpu_model() -> str:
    """The CPU's model name (lscpu's "Model name", else /proc/cpuinfo's "model name")."""
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_bandwidth(gib: float = 1.0, threads: int = 2, repeat: int = 5) -> float:
    """The box's memory read bandwidth in GB/s: a float32 `sum` over `gib` GiB (far larger than
    any cache) on `threads` threads, best of `repeat`. The yardstick that decode at batch 1 — a
    stream of weights read once per token — is bounded by (issue 19): kernels and whole decode
    steps are reported as a fraction of it, so figures from different CPUs compare."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(int(gib * 2**30) // 4)
        best = bench(lambda: x.sum(), warmup=1, repeat=repeat)
        return x.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(before)


def quiet_transformers():
    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
