"""GPU-only checks, run on a lent CUDA machine (not in CI): `python scripts/gpu_check.py OUT.json`.

1. the model on CUDA matches the CPU (fp32 logits) and runs in bf16;
2. MoE sparse dispatch: `F.grouped_mm` (bf16, sm90+) against the per-expert loop, and fwd+bwd time
   of herd's MoE vs transformers' Llama4TextMoe at Scout's layer shape;
3. FP8: the real `torch._scaled_mm` linear against the emulated one, and its speed vs bf16.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cuda_time(fn, repeat=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def main(out_path: str) -> None:
    import torch.nn.functional as F

    import herd
    from herd.config import TextConfig
    from herd.model.moe import MoE
    from herd.train import fp8

    res: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0),
                 "capability": list(torch.cuda.get_device_capability(0)),
                 "grouped_mm_available": hasattr(F, "grouped_mm"),
                 "scaled_mm_available": fp8.scaled_mm_available(torch.device("cuda"))}
    dev = torch.device("cuda")

    # 1. model parity CPU vs CUDA
    from tests.conftest import model_config

    cfg = model_config(vision=True, text=dict(num_experts_per_tok=2))
    cpu = herd.build_model(cfg, seed=0).eval()
    gpu = herd.build_model(cfg, seed=0).to(dev).eval()
    ids = torch.randint(0, 400, (2, 70))
    ids[0, 3:11] = cfg.image_token_index
    px = torch.randn(2, 3, 28, 28)
    ids[1, 3:11] = cfg.image_token_index
    px = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        a = cpu(ids, pixel_values=px)
        b = gpu(ids.to(dev), pixel_values=px.to(dev)).cpu()
        gpu16 = gpu.to(torch.bfloat16)
        c = gpu16(ids.to(dev), pixel_values=px.to(dev)).float().cpu()
    res["model_cuda_fp32_max_abs_diff"] = (a - b).abs().max().item()
    res["model_cuda_bf16_corr"] = torch.corrcoef(torch.stack([a.flatten(), c.flatten()]))[0, 1].item()

    # 2. MoE at Scout's shape (hidden 5120, expert 8192, 16 experts), 4096 tokens, bf16
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    H, I, E, N = 5120, 8192, 16, 4096
    tc = TextConfig(vocab_size=256, hidden_size=H, intermediate_size=I, intermediate_size_mlp=I, num_hidden_layers=1,
                    num_attention_heads=40, num_key_value_heads=8, head_dim=128, num_local_experts=E)
    ours = MoE(tc).to(dev)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    ours = ours.to(torch.bfloat16)
    x = torch.randn(N, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
    outs = {}
    for impl in ("grouped", "loop"):
        ours.impl = impl
        try:
            with torch.no_grad():
                outs[impl] = ours(x).float()

            def step():
                ours.zero_grad(set_to_none=True)
                ours(x).float().square().mean().backward()

            res[f"moe_{impl}_fwd_bwd_ms"] = cuda_time(step, repeat=5) * 1e3
        except Exception as e:  # noqa: BLE001
            res[f"moe_{impl}_error"] = repr(e)[:300]
    if "grouped" in outs and "loop" in outs:
        res["moe_grouped_vs_loop_rel"] = ((outs["grouped"] - outs["loop"]).norm() / outs["loop"].norm()).item()
    hf = Llama4TextMoe(Llama4TextConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                        num_experts_per_tok=1)).to(dev)
    hf.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    hf = hf.to(torch.bfloat16)
    with torch.no_grad():
        ref = hf(x)[0].float()
    res["moe_vs_transformers_rel"] = ((outs.get("grouped", outs.get("loop")) - ref).norm() / ref.norm()).item()

    def hf_step():
        hf.zero_grad(set_to_none=True)
        hf(x)[0].float().square().mean().backward()

    res["moe_transformers_fwd_bwd_ms"] = cuda_time(hf_step, repeat=3) * 1e3
    del hf, ours, x
    torch.cuda.empty_cache()

    # 3. FP8: real _scaled_mm vs emulation, and speed vs bf16
    for recipe in fp8.RECIPES:
        M = K = Nn = 8192
        xa = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        lin = torch.nn.Linear(K, Nn, bias=False, device=dev, dtype=torch.bfloat16)
        fp8.convert_to_fp8(torch.nn.ModuleList([lin]), recipe)
        with torch.no_grad():
            real = lin(xa).float()
            emu = fp8.fp8_linear(xa.float(), lin.weight.float(), recipe)
            exact = xa.float() @ lin.weight.float().T
        res[f"fp8_{recipe}_real_vs_emulated_rel"] = ((real - emu).norm() / emu.norm()).item()
        res[f"fp8_{recipe}_vs_exact_rel"] = ((real - exact).norm() / exact.norm()).item()
        with torch.no_grad():
            t_fp8 = cuda_time(lambda: lin(xa))
            w16 = lin.weight.detach()
            t_bf16 = cuda_time(lambda: xa @ w16.T)
        res[f"fp8_{recipe}_tflops"] = 2 * M * K * Nn / t_fp8 / 1e12
        res["bf16_tflops"] = 2 * M * K * Nn / t_bf16 / 1e12
        xg = torch.randn(256, 512, device=dev, requires_grad=True)
        lg = torch.nn.Linear(512, 256, bias=False, device=dev)
        fp8.convert_to_fp8(torch.nn.ModuleList([lg]), recipe)
        lg(xg.bfloat16()).float().sum().backward()
        res[f"fp8_{recipe}_backward_ok"] = bool(torch.isfinite(lg.weight.grad).all())

    Path(out_path).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_check.json")
