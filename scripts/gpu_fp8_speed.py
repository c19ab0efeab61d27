"""FP8 GEMM speed on a CUDA GPU (not CI): raw torch._scaled_mm on pre-quantised operands, herd's
eager FP8Linear (quantises both operands every call), and the same under torch.compile, vs bf16."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def t(fn, n=20):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n / 1e3


def main(out):
    from herd.train import fp8

    M = K = N = 8192
    flop = 2 * M * K * N
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    res = {"bf16_tflops": flop / t(lambda: x @ w.T) / 1e12}
    for recipe in fp8.RECIPES:
        rw = recipe == "rowwise"
        xq, xs = fp8.quantize(x, fp8.E4M3, -1 if rw else None)
        wq, ws = fp8.quantize(w, fp8.E4M3, -1 if rw else None)
        sa, sb = (xs.reshape(-1, 1), ws.reshape(1, -1)) if rw else (xs, ws)
        res[f"{recipe}_scaled_mm_only_tflops"] = flop / t(
            lambda: torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)) / 1e12
        lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        fp8.convert_to_fp8(torch.nn.ModuleList([lin]), recipe)
        with torch.no_grad():
            res[f"{recipe}_fp8linear_eager_tflops"] = flop / t(lambda: lin(x)) / 1e12
            try:
                comp = torch.compile(lin)
                res[f"{recipe}_fp8linear_compiled_tflops"] = flop / t(lambda: comp(x)) / 1e12
            except Exception as e:  # noqa: BLE001
                res[f"{recipe}_compile_error"] = repr(e)[:300]
    Path(out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_fp8_speed.json")
