"""MetaP: per-layer learning rates and initialisation scales that transfer across model sizes.

Meta says only that MetaP "sets critical hyper-parameters such as per-layer learning rates and
initialisation scales" so they "transfer well across values of batch size, model width, depth and
training tokens". herd implements it as μP for Adam (Yang et al., Tensor Programs V, table 3)
plus depth scaling of the residual branches, relative to a *base* shape on which the learning
rate is tuned once:

| parameter kind                       | init std                         | Adam LR multiplier        |
|--------------------------------------|----------------------------------|---------------------------|
| embeddings (input weights)           | σ_emb = 1 (constant in width)     | 1                         |
| hidden matrices (attention, MLPs,    | gain / √fan_in                    | base_width / width        |
|   experts, router, vision, projector)| × 1/√(2·layers/base_layers) on   |                           |
|                                      |   residual outputs (o, down)      |                           |
| LM head (output weights)             | gain / fan_in · √base_width       | base_width / width        |
| norms, biases, class/pos embeddings  | 1 / 0 / σ_emb                     | 1                         |

and an optional batch-size rule (Adam: LR ∝ √(batch/base_batch)). `vision_lr_mult` scales the
vision tower's and projector's rates on top (0 keeps them at init: the tiny recipe does, because
trained from scratch at the text model's rate they collapse every image onto one feature vector). σ_emb = 1 is μP's value (an
input weight's fan-in is 1, a one-hot); GPT-2's 0.02 leaves token embeddings 50× smaller than the
image features fused in beside them and than the first attention outputs, and at tiny scale it
cost both the text loss (val 5.59 vs 5.28 at step 100 of the tiny mixture) and the digit
captions (accuracy 0.34 vs 0.85 after 150 digit-only steps). With MetaP off, every
parameter uses the transformers initialisation (normal, std 0.02) and the same learning rate.
The model's forward pass is unchanged either way, so checkpoints stay Hugging Face compatible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class MetaPConfig:
    base_width: int = 256  # hidden size the learning rate was tuned at
    base_layers: int = 4
    base_batch_tokens: int | None = None  # set to scale LR with √(batch / base) (Adam rule)
    gain: float = 1.0
    embed_std: float = 1.0  # μP: input weights have fan_in 1 (one-hot), so σ = 1, constant in width
    vision_lr_mult: float = 1.0  # extra LR multiplier of the vision tower + projector (every tensor there)


RESIDUAL_OUTPUTS = ("o_proj.weight", "down_proj.weight", "experts.down_proj", "fc2.weight")


def classify(name: str, param: torch.Tensor) -> str:
    """'embedding' | 'head' | 'hidden' | 'vector' for a parameter name of herd's Llama4."""
    if name.endswith("embed_tokens.weight"):
        return "embedding"
    if name.endswith("lm_head.weight"):
        return "head"
    if param.dim() < 2 or name.endswith(("class_embedding", "positional_embedding_vlm")):
        return "vector"
    return "hidden"


def fan_in(name: str, param: torch.Tensor) -> int:
    """Input dimension of a matrix: nn.Linear stores [out, in]; fused experts store [E, in, out]."""
    if param.dim() == 3:
        return param.shape[1]
    return param.shape[-1]


def width_multiplier(model, cfg: MetaPConfig) -> float:
    return model.config.text.hidden_size / cfg.base_width


def _is_vision(name: str) -> bool:
    return name.startswith(("vision_model.", "multi_modal_projector."))


@torch.no_grad()
def init_metap(model, cfg: MetaPConfig | None = None, generator: torch.Generator | None = None) -> None:
    """Re-initialise every parameter with MetaP's scales (see the module table)."""
    cfg = cfg or MetaPConfig()
    layers = model.config.text.num_hidden_layers
    depth_scale = 1.0 / math.sqrt(2.0 * layers / cfg.base_layers)
    tied = model.config.text.tie_word_embeddings
    for name, p in model.named_parameters():
        kind = classify(name, p)
        if kind == "embedding":
            p.normal_(0.0, cfg.embed_std, generator=generator)
        elif kind == "head":
            if not tied:
                p.normal_(0.0, cfg.gain / fan_in(name, p) * math.sqrt(cfg.base_width), generator=generator)
        elif kind == "hidden":
            std = cfg.gain / math.sqrt(fan_in(name, p))
            if name.endswith(RESIDUAL_OUTPUTS) and not _is_vision(name):
                std *= depth_scale
            p.normal_(0.0, std, generator=generator)
        else:  # vectors: norms → 1, biases → 0, class/positional embeddings small
            if name.endswith(("class_embedding", "positional_embedding_vlm")):
                p.normal_(0.0, cfg.embed_std, generator=generator)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def lr_multipliers(model, cfg: MetaPConfig | None = None, enabled: bool = True) -> dict[str, float]:
    """Per-parameter learning-rate multiplier (1.0 everywhere when MetaP is off)."""
    cfg = cfg or MetaPConfig()
    out = {}
    m = width_multiplier(model, cfg)
    for name, p in model.named_parameters():
        kind = classify(name, p)
        out[name] = 1.0 / m if enabled and kind in ("hidden", "head") else 1.0
        if enabled and _is_vision(name):
            out[name] *= cfg.vision_lr_mult
    return out


def param_groups(model, lr: float, weight_decay: float = 0.1, cfg: MetaPConfig | None = None,
                 enabled: bool = True, batch_tokens: int | None = None) -> list[dict]:
    """AdamW parameter groups: one per (LR multiplier, decay) pair. Each group carries `lr_mult`,
    so the schedule sets group["lr"] = lr × schedule(step) × lr_mult. Frozen parameters are left out."""
    cfg = cfg or MetaPConfig()
    mults = lr_multipliers(model, cfg, enabled)
    batch_mult = 1.0
    if enabled and cfg.base_batch_tokens and batch_tokens:
        batch_mult = math.sqrt(batch_tokens / cfg.base_batch_tokens)
    groups: dict[tuple, dict] = {}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        decay = weight_decay if classify(name, p) in ("hidden", "head") else 0.0
        key = (mults[name] * batch_mult, decay)
        g = groups.setdefault(key, {"params": [], "names": [], "lr_mult": key[0], "weight_decay": decay,
                                    "lr": lr * key[0]})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def standard_init(model, generator: torch.Generator | None = None) -> None:
    """The ablation: transformers' initialisation (normal 0.02 everywhere)."""
    model.init_weights(generator=generator)


def describe(groups: list[dict]) -> str:
    """One line per AdamW group: LR multiplier, weight decay, tensors and parameters."""
    rows = [f"  lr×{g['lr_mult']:.3g}  wd {g['weight_decay']:.2g}  {len(g['params'])} tensors "
            f"({sum(p.numel() for p in g['params']):,} params)" for g in groups]
    return "\n".join(rows)

