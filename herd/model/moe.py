"""Feed-forward blocks: the dense SwiGLU MLP and Llama 4's mixture of experts.

MoE as Llama 4 defines it:
  router logits → top-k experts per token → sigmoid of the kept logits scales the expert *input*;
  a shared expert (a dense SwiGLU) runs on every token and is added to the routed output.

Dispatch is sparse: only the selected (token, expert) pairs are computed. Pairs are sorted by
expert and the experts run as one grouped GEMM over contiguous groups (`F.grouped_mm`) — or one
matmul per non-empty expert where grouped_mm is unavailable for the dtype/device. The reference
implementations instead push every token through every expert.

Expert weights are stored fused, exactly as the published checkpoints store them:
  experts.gate_up_proj [E, H, 2·I]   (gate = first I columns, up = last I)
  experts.down_proj    [E, I, H]

The load-balancing bias (`expert_bias` [E], herd-only). Auxiliary-loss-free balancing
(herd.train.balance, after DeepSeek-V3) adds a per-expert bias to the router logits for *choosing*
experts; the gate still uses the raw logit. `herd train` uses it by default, so its validation loss
and digit accuracy are measured with it, and it is part of the model: dropping it on save changed
48 of 64 expert choices and logits by 4e-2 on the tiny model (issue 17; FlagScale PR #412 fixed
the same fault). It cannot be folded into the published format: that format has no router bias,
and no change to the router weight shifts one expert's logit by a constant for every input.
So herd keeps it as an extra tensor:
  * `save_model` writes `…feed_forward.expert_bias` [E] (float32) next to the published tensors
    for every MoE whose bias is not all zero; a model without one (every published checkpoint,
    every model trained with --balance switch or none) writes exactly the published key set;
  * `load_model` reads it when present and uses zeros when absent, so herd evaluates, saves and
    reloads the same routing;
  * transformers loads such a directory (it ignores the extra tensors) but routes without the
    bias, so for that model its logits are herd's with `drop_expert_bias` applied, not the ones
    herd evaluated. Where transformers must reproduce herd exactly, train with `--balance switch`
    (no bias), or zero the bias (`drop_expert_bias`) and evaluate that model before exporting it.
It stays a non-persistent buffer (outside `state_dict()`), so code that copies state dicts between
herd and transformers' modules keeps working; `expert_biases` and weights.py are its way in and out.
tests/model/test_roundtrip.py checks that every tensor a forward reads survives save → load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import TextConfig


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)). Names match Hugging Face's `Llama4TextMLP`."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    """F.grouped_mm runs on CPU for fp32/bf16 (torch ≥ 2.9); on CUDA for bf16 on sm90+ GPUs."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


def _dense_enough(x: torch.Tensor, w: torch.Tensor) -> bool:
    """On CPU, grouped_mm pays off over per-expert matmuls only with enough rows per expert
    (measured: 16 experts × 256 rows it wins by 1.4×; 128 experts × 32 rows it loses by 1.6–2.7×)."""
    return x.device.type != "cpu" or x.shape[0] >= 64 * w.shape[0]


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor,
                   impl: str = "auto") -> torch.Tensor:
    """Rows of x [M, K] sorted into contiguous groups (group e has counts[e] rows) times w[e] [K, N].

    → [M, N]. `offsets` is the int32 cumulative sum of counts (grouped_mm's end offsets).
    """
    if impl == "grouped" or (impl == "auto" and _grouped_mm_ok(x) and _dense_enough(x, w)):
        return F.grouped_mm(x, w, offs=offsets)
    # Fallback: one matmul per non-empty expert. unbind() once, so backward does not allocate a
    # full [E, K, N] gradient per expert (a slice inside the loop would).
    ws = w.unbind(0)
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            outs.append(x[start:start + n] @ ws[e])
            start += n
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[-1])


class Experts(nn.Module):
    """The routed experts' fused weights (names/shapes as in Hugging Face's `Llama4TextExperts`)."""

    def __init__(self, n_experts: int, hidden: int, inner: int):
        super().__init__()
        self.num_experts, self.inner = n_experts, inner
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, hidden, 2 * inner))
        self.down_proj = nn.Parameter(torch.empty(n_experts, inner, hidden))
        # The grouped product (x, w[E,K,N], counts, offsets, impl) → [M, N]. Swappable, so training
        # can run it in FP8 (herd.train.fp8) and inference quantised, without touching this module.
        self.matmul = grouped_matmul

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        """x_sorted [M, H] grouped by expert (counts [E]) → [M, H]."""
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        gate_up = self.matmul(x_sorted, self.gate_up_proj, counts, offsets, impl)  # [M, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        return self.matmul(F.silu(gate) * up, self.down_proj, counts, offsets, impl)  # [M, H]


class MoE(nn.Module):
    """Router + routed experts + shared expert. Names match Hugging Face's `Llama4TextMoe`."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        H, E = cfg.hidden_size, cfg.num_local_experts
        self.num_experts, self.top_k = E, cfg.num_experts_per_tok
        self.router = nn.Linear(H, E, bias=False)
        self.experts = Experts(E, H, cfg.intermediate_size)
        self.shared_expert = SwiGLU(H, cfg.intermediate_size)
        # Auxiliary-loss-free load balancing (training): a per-expert bias added to the logits for
        # *selection only*; the gate value still comes from the raw logit. Zero = plain Llama 4.
        self.register_buffer("expert_bias", torch.zeros(E), persistent=False)
        self.impl = "auto"  # "auto" | "grouped" | "loop" (benchmarks switch it)
        self.last_counts: torch.Tensor | None = None  # tokens per expert in the last forward
        self.last_logits: torch.Tensor | None = None  # router logits of the last forward (training)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] → (logits [N, E], top expert ids [N, k], gate values [N, k] in x's dtype)."""
        logits = self.router(x)
        select = logits + self.expert_bias.to(logits.dtype) if self.expert_bias.any() else logits
        top_ids = select.topk(self.top_k, dim=-1).indices
        gates = torch.sigmoid(logits.gather(-1, top_ids).float()).to(x.dtype)
        return logits, top_ids, gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, H]
        N, k = x.shape[0], self.top_k
        logits, top_ids, gates = self.route(x)
        flat_ids = top_ids.reshape(-1)  # [N·k]
        order = torch.argsort(flat_ids, stable=True)
        token_of = order // k  # source token of each sorted pair
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        x_sorted = x[token_of] * gates.reshape(-1, 1)[order]  # gate scales the expert input
        y_sorted = self.experts(x_sorted, counts, self.impl)  # [N·k, H]
        out = self.shared_expert(x)
        out = out.index_add(0, token_of, y_sorted.to(out.dtype))
        if self.training:
            self.last_logits = logits
        self.last_counts = counts.detach()
        return out.view(shape)


def expert_biases(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{"<MoE path>.expert_bias": bias [E] float32}` for every MoE whose bias is not all zero:
    the herd-only tensors `save_model` writes beside the published ones."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, MoE) and not m.expert_bias.is_meta and bool(m.expert_bias.any()):
            out[f"{name}.expert_bias"] = m.expert_bias.detach().float().cpu()
    return out


def drop_expert_bias(model: nn.Module) -> nn.Module:
    """Zero every MoE's load-balancing bias (in place): the routing transformers runs. Returns model."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.expert_bias.zero_()
    return model
