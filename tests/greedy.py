"""Greedy decodings compared with a margin, for paths that round differently.

Two correct implementations that sum in different orders (a fused inference path and the plain
model, bf16 products on AMX and on AVX-512, one process and two) give logits that agree to a
tolerance, not to the bit. Where the best two logits of a step lie within that tolerance, either
may win, and from there the two greedy decodings part. So a decoding is checked against the
reference model's own logits, teacher-forced on the decoded tokens: every chosen token must be
the reference's argmax to within `tol`. A wrong path still fails (its tokens are far from the
reference's best), and a near-tie broken the other way does not.
"""

from __future__ import annotations

import torch


def assert_greedy_under(reference, prompt: list[int], tokens: list[int], tol: float, pixel_values=None) -> int:
    """`tokens` is a greedy decoding of `prompt` under `reference` (a model or a callable returning
    logits [1, T, vocab]) up to `tol`. Returns how many steps took a near-tie the other way."""
    assert tokens, "nothing was decoded"
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        out = reference(ids, pixel_values=pixel_values) if pixel_values is not None else reference(ids)
    logits = getattr(out, "logits", out)[0, len(prompt) - 1:-1].float()  # [n_tokens, vocab]: the step's logits
    chosen = logits.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    gap = logits.max(-1).values - chosen  # ≥ 0; 0 where the reference agrees
    bad = (gap > tol).nonzero().flatten().tolist()
    assert not bad, f"steps {bad}: chosen token's logit below the reference's best by {gap[bad].tolist()} > {tol}"
    return int((gap > 0).sum())
