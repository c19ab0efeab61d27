"""Per-guard latency (p50 / p99) of herd.safety's guards on this machine.

    python benchmarks/guards.py [--llama runs/tiny-guard] [--prompt runs/prompt-guard] [--n 200]
    python benchmarks/guards.py --quick          # smoke run: a few scans per guard

Each guard scans the same kind of input it sees in the pipeline, one call at a time (batch 1,
as in serving), after a warm-up:
  * Llama Guard: prompt classification of S-Labs test prompts (the full Llama Guard 4 prompt,
    S1–S14, ~200 tokens + the prompt) through LlamaGuard.scan — score forward + greedy verdict.
    Also the guard4 12B shape cannot run here; the tiny trained guard stands in.
  * Prompt Guard: the herd n-gram model on S-Labs test prompts (normalise → windows → score).
  * Code Shield: replies with one fenced code block, half insecure (regex hit), half clean (regex
    miss, semgrep run when the prescan matches), in Python, C and JavaScript.
Prints a markdown table (p50, p99, mean, calls/s) and the machine line; absolute times need an
idle machine (see BENCHMARKS.md for the load the figures were taken under).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import load_average, machine, markdown_table, setup_threads  # noqa: E402

CODE = [
    "Here:\n```python\nimport hashlib\nh = hashlib.md5(data).hexdigest()\n```",
    "Here:\n```python\ndef add(a, b):\n    return a + b\n```",
    "```python\nimport os\nos.system(cmd)\n```",
    "```c\n#include <stdio.h>\nint main() { char b[8]; gets(b); return 0; }\n```",
    "```c\nint add(int a, int b) { return a + b; }\n```",
    "```javascript\nfunction f(x) { return eval(x + '1'); }\n```",
    "```javascript\nfunction add(a, b) { return a + b; }\n```",
]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def time_scans(scan, inputs) -> list[float]:
    scan(inputs[0])  # warm-up
    out = []
    for x in inputs:
        t = time.perf_counter()
        scan(x)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama", default="runs/tiny-guard")
    ap.add_argument("--prompt", default="runs/prompt-guard")
    ap.add_argument("--n", type=int, default=200, help="scans per guard")
    ap.add_argument("--quick", action="store_true", help="5 scans per guard (smoke run)")
    args = ap.parse_args(argv)
    n = 5 if args.quick else args.n
    setup_threads()
    import torch

    from herd.data.safety_data import slabs

    prompts = [t for t, _ in slabs("test")][:n]
    rows = []
    if Path(args.llama, "config.json").exists():
        from herd.safety.llama_guard import LlamaGuard

        lg = LlamaGuard.from_pretrained(args.llama, dtype=torch.float32)
        ms = time_scans(lambda t: lg.scan(t), prompts)
        rows.append(["Llama Guard (tiny trained, fp32)", ms])
    else:
        print(f"(no Llama Guard at {args.llama}: herd guard train-llama --out {args.llama})")
    if Path(args.prompt, "config.json").exists():
        from herd.safety.prompt_guard import load_prompt_guard

        pg = load_prompt_guard(args.prompt)
        rows.append(["Prompt Guard (herd n-gram)", time_scans(pg.scan, prompts)])
    else:
        print(f"(no Prompt Guard at {args.prompt}: herd guard train-prompt --out {args.prompt})")
    from herd.safety.code_shield import CodeShield

    cs = CodeShield()
    rows.append(["Code Shield (codeshield rules + semgrep)", time_scans(cs.scan, (CODE * (n // len(CODE) + 1))[:n])])
    table = [[name, len(ms), f"{percentile(ms, 50):.1f}", f"{percentile(ms, 99):.1f}", f"{statistics.mean(ms):.1f}",
              f"{1e3 / statistics.mean(ms):.1f}"] for name, ms in rows]
    print(markdown_table(["guard", "scans", "p50 ms", "p99 ms", "mean ms", "scans/s"], table))
    print(f"{machine()}, load average {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
