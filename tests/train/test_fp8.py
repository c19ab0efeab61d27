"""FP8: quantisation error bounds and the emulated scaled matmul against float64."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.train import fp8
from tests.conftest import model_config


@pytest.mark.parametrize("dtype,mantissa", [(fp8.E4M3, 3), (fp8.E5M2, 2)])
@pytest.mark.parametrize("dim", [None, -1])
def test_quantisation_error_bound(dtype, mantissa, dim):
    x = torch.randn(64, 256) * torch.logspace(-2, 2, 256)  # wide dynamic range across columns
    q, s = fp8.quantize(x, dtype, dim)
    assert q.dtype == dtype
    back = fp8.dequantize(q, s)
    # normal range: relative error ≤ 2^-(mantissa+1); tiny values flush to subnormals: absolute bound
    amax = x.abs().amax() if dim is None else x.abs().amax(dim, keepdim=True)
    tiny = amax / fp8.FP8_MAX[dtype] * torch.finfo(dtype).smallest_normal
    err = (back - x).abs()
    assert torch.all(err <= x.abs() * 2.0 ** -(mantissa + 1) + tiny * 1.01)
    assert back.abs().amax() <= amax.max() * (1 + 2.0 ** -(mantissa + 1))


def test_rowwise_beats_tensorwise_on_rows_of_different_scale():
    x = torch.randn(32, 128) * torch.logspace(-3, 3, 32)[:, None]
    err = {d: (fp8.qdq(x, fp8.E4M3, d) - x).abs().div(x.abs().amax(-1, keepdim=True)).max().item()
           for d in (None, -1)}
    assert err[-1] < 0.07 and err[None] > 4 * err[-1]


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_fp8_linear_forward_and_backward_against_float64(recipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 96, generator=g, requires_grad=True)
    w = torch.randn(80, 96, generator=g, requires_grad=True)
    dy = torch.randn(48, 80, generator=g)
    y = fp8.fp8_linear(x, w, recipe)
    y.backward(dy)
    xd, wd = x.detach().double(), w.detach().double()
    ref = xd @ wd.T
    rel = ((y.detach().double() - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.05  # measurably quantised, and close
    gx_ref, gw_ref = dy.double() @ wd, dy.double().T @ xd
    assert ((x.grad.double() - gx_ref).norm() / gx_ref.norm()).item() < 0.1
    assert ((w.grad.double() - gw_ref).norm() / gw_ref.norm()).item() < 0.1
    # the forward operands really are float8 values: re-quantising them changes nothing
    xq = fp8.qdq(x.detach(), fp8.E4M3, -1 if recipe == "rowwise" else None)
    torch.testing.assert_close(fp8.qdq(xq, fp8.E4M3, -1 if recipe == "rowwise" else None), xq)


def test_gradient_is_quantised_to_e5m2():
    x = torch.randn(16, 32, requires_grad=True)
    w = torch.eye(32, requires_grad=True)
    dy = torch.randn(16, 32)
    fp8.fp8_linear(x, w, "tensorwise").backward(dy)
    # with an identity weight, x.grad is the e5m2 image of dy
    torch.testing.assert_close(x.grad, fp8.qdq(dy, fp8.E5M2, None))
    assert not torch.equal(x.grad, dy)


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_convert_model_to_fp8_keeps_names_and_stays_close(recipe, tmp_path):
    cfg = model_config(vision=True)
    m = herd.build_model(cfg, seed=0)
    ids = torch.randint(0, 400, (2, 40))
    ref = m(ids)
    n = fp8.convert_to_fp8(m, recipe)
    assert n == cfg.text.num_hidden_layers * (4 + 3 + 1)  # q,k,v,o + shared expert + experts per layer
    assert type(m.language_model.lm_head) is torch.nn.Linear
    assert type(m.layers[0].feed_forward.router) is torch.nn.Linear
    out = m(ids)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.1
    out.float().square().mean().backward()
    assert m.layers[0].feed_forward.experts.gate_up_proj.grad is not None
    herd.save_model(m, tmp_path)  # same parameter names: the checkpoint is an ordinary one
    assert set(herd.load_model(tmp_path).state_dict()) == set(m.state_dict())


def test_unknown_recipe():
    with pytest.raises(ValueError, match="recipe"):
        fp8.convert_to_fp8(torch.nn.Linear(2, 2), "blockwise")
