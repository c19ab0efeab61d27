"""The fused, chunked LM-head + cross-entropy against F.cross_entropy on full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import herd
from herd.model.loss import linear_cross_entropy


def _inputs(N=300, H=48, V=1000, ignore=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, N // 3, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.2
    y = torch.randint(0, V, (3, N // 3), generator=g)
    if ignore:
        y[0, :7] = -100
        y[2, -1] = -100
    return h, w, y


def _reference(h, w, y, reduction):
    return F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk", [None, 64, 7])
def test_matches_cross_entropy_on_full_logits_fp32(reduction, chunk):
    h, w, y = _inputs()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = _reference(h1, w1, y, reduction)
    out = linear_cross_entropy(h2, w2, y, reduction=reduction, chunk_size=chunk)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (ref * 1.7).backward()  # a non-unit incoming gradient
    (out * 1.7).backward()
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-5)
    assert h2.grad[0, :7].abs().max() == 0  # ignored tokens pass no gradient


def test_bf16_autocast_matches_the_unfused_autocast_path():
    h, w, y = _inputs(ignore=False)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference(h1, w1, y, "mean")
        out = linear_cross_entropy(h2, w2, y, reduction="mean", chunk_size=64)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # same bf16 logits, float32 softmax
    ref.backward()
    out.backward()
    assert h2.grad.dtype == h.dtype and w2.grad.dtype == w.dtype
    # gradients go through bf16 products in both: agreement to bf16 rounding
    torch.testing.assert_close(h2.grad, h1.grad, rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=2e-2, atol=2e-4)


def test_without_gradients_and_errors():
    h, w, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, y, chunk_size=50), _reference(h, w, y, "sum"))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, y, reduction="none")
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, y[:, :-1])


def test_model_forward_with_labels_returns_the_summed_loss():
    model = herd.build_model(herd.get_config("tiny").text_only(), seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 8000, (2, 40), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    ref = F.cross_entropy(model(ids).float().flatten(0, 1), labels.flatten(), reduction="sum")
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.backward()
    for n, p in model.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)
