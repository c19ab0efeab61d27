"""The iRoPE ablation's passkey arms (benchmarks/irope_extrapolation.py): what its shortcut relies on.

Arms a (iRoPE + temperature, floor_scale = L) and b (iRoPE, no temperature) are trained once per
seed and evaluated under both configs. That is only sound if training them separately would give
the same network; these tests check it bit for bit, and that the temperature does act beyond L.
"""

import importlib.util
from pathlib import Path

import torch

from herd.model.llama4 import build_model

_spec = importlib.util.spec_from_file_location(
    "irope_extrapolation", Path(__file__).resolve().parents[2] / "benchmarks" / "irope_extrapolation.py")
irope = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(irope)

L = 64


def _train(arm: str, steps: int = 3) -> tuple[list[float], dict]:
    model = build_model(irope.passkey_config(arm, L, 32, 4, 64 * L), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        ids, labels = irope.passkey_batch(4, L, gen)
        loss = model(ids, labels=labels) / (4 * irope.PK_N)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model.state_dict()


def test_arms_a_and_b_train_bit_identical_networks_at_floor_scale_L(one_thread):
    cfg_a = irope.passkey_config("a", L, 32, 4, 64 * L).text
    assert cfg_a.attn_temperature_tuning and cfg_a.floor_scale == L
    loss_a, state_a = _train("a")
    loss_b, state_b = _train("b")
    assert loss_a == loss_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_temperature_changes_the_answer_logits_only_beyond_L(one_thread):
    a = build_model(irope.passkey_config("a", L, 32, 4, 64 * L), seed=0).eval()
    b = build_model(irope.passkey_config("b", L, 32, 4, 64 * L), seed=0).eval()
    b.load_state_dict(a.state_dict())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ids, _ = irope.passkey_batch(2, L, gen)
        assert torch.equal(a(ids, logits_slice=slice(L - 5, L - 1)), b(ids, logits_slice=slice(L - 5, L - 1)))
        ids, _ = irope.passkey_batch(2, 4 * L, gen)
        assert not torch.allclose(a(ids, logits_slice=slice(-5, -1)), b(ids, logits_slice=slice(-5, -1)))


def test_multikey_rows_hold_distinct_needles_and_ask_for_one_of_them():
    ids, labels = irope.multikey_batch(16, L, torch.Generator().manual_seed(0))
    for row, lab in zip(ids.tolist(), labels.tolist()):
        starts = [i for i, t in enumerate(row) if t == irope.PK_KEY]
        assert len(starts) == irope.MK_KEYS and row.count(irope.PK_QUERY) == 1
        names = [row[i + 1] for i in starts]
        assert len(set(names)) == irope.MK_KEYS and all(irope.MK_NAME0 <= n < irope.MK_VOCAB for n in names)
        q = row.index(irope.PK_QUERY)
        assert q == L - irope.PK_N - 2
        asked = starts[names.index(row[q + 1])]
        answer = row[asked + 2:asked + 2 + irope.PK_N]
        assert row[q + 2:] == answer and lab[q + 1:q + 1 + irope.PK_N] == answer  # targets of positions L-5…L-2
        assert all(x == -100 for i, x in enumerate(lab) if not q + 1 <= i < q + 1 + irope.PK_N)
    try:
        irope.multikey_batch(1, 24, torch.Generator())
    except ValueError as e:
        assert "multikey rows need at least" in str(e)
    else:
        raise AssertionError("a row too short for 4 needles must be refused")
