"""Parameter counts — total and active per token — without allocating any weights (meta device).

"Active" counts what one *text* token touches in a forward pass: the embedding table and LM head,
every attention layer, every norm, every router, the shared expert and dense MLPs, and top_k of
the num_local_experts routed experts in each MoE layer. The vision tower and projector are not
part of it (they run once per image tile, not per token). This is the convention of Meta's
"17B active" figures: with it, Scout gives 17,172,894,720 and Maverick 17,184,691,200.
"""

from __future__ import annotations

import torch

from herd.config import ModelConfig

CATEGORIES = ("embeddings", "attention", "routed_experts", "shared_expert", "dense_mlp", "router", "norms",
              "lm_head", "vision", "projector")


def _category(name: str) -> str:
    if name.startswith("vision_model."):
        return "vision"
    if name.startswith("multi_modal_projector."):
        return "projector"
    if "embed_tokens" in name:
        return "embeddings"
    if "lm_head" in name:
        return "lm_head"
    if ".self_attn." in name:
        return "attention"
    if ".experts." in name:
        return "routed_experts"
    if ".shared_expert." in name:
        return "shared_expert"
    if ".router." in name:
        return "router"
    if ".feed_forward." in name:
        return "dense_mlp"
    return "norms"


def count_params(config: ModelConfig | str) -> dict:
    """{"total", "active", "text_total", "breakdown": {category: count}} for a config or preset name."""
    from herd.model.llama4 import Llama4

    if isinstance(config, str):
        from herd.presets import get_config

        config = get_config(config)
    with torch.device("meta"):
        model = Llama4(config)
    breakdown = dict.fromkeys(CATEGORIES, 0)
    for name, p in model.named_parameters():  # tied weights appear once
        breakdown[_category(name)] += p.numel()
    tc = config.text
    total = sum(breakdown.values())
    routed_active = breakdown["routed_experts"] * tc.num_experts_per_tok // max(tc.num_local_experts, 1)
    active = total - breakdown["vision"] - breakdown["projector"] - breakdown["routed_experts"] + routed_active
    return {"total": total, "active": active, "text_total": total - breakdown["vision"] - breakdown["projector"],
            "breakdown": breakdown}


def format_count(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def params_table(name: str, counts: dict) -> str:
    rows = [(k.replace("_", " "), v) for k, v in counts["breakdown"].items() if v]
    rows += [("", None), ("total", counts["total"]), ("active per text token", counts["active"])]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name}", f"{'part':<{width}}  {'parameters':>17}  {'':>8}"]
    for label, v in rows:
        lines.append("" if v is None else f"{label:<{width}}  {v:>17,}  {format_count(v):>8}")
    return "\n".join(lines)
