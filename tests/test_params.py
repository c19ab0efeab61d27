"""Parameter counts: exact published totals/active counts, and transformers as an oracle."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from herd.params import count_params
from herd.presets import get_config

# Measured with transformers on the published configs (meta device); see shared/FACTS.md.
PUBLISHED = {
    "scout": (108_641_793_536, 17_172_894_720),
    "maverick": (401_583_781_376, 17_184_691_200),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_counts_are_exact(name):
    total, active = PUBLISHED[name]
    counts = count_params(name)
    assert (counts["total"], counts["active"]) == (total, active)
    assert sum(counts["breakdown"].values()) == total


def test_behemoth_and_guard4_land_on_the_published_sizes():
    b = count_params("behemoth")
    assert abs(b["total"] / 2e12 - 1) < 0.05 and abs(b["active"] / 288e9 - 1) < 0.02
    g = count_params("guard4")
    assert g["breakdown"]["routed_experts"] == 0 and abs(g["total"] / 12e9 - 1) < 0.02


@pytest.mark.parametrize("name", ["maverick", "tiny"])
def test_total_equals_transformers_on_meta_device(name):
    import transformers

    cfg = get_config(name)
    d = {k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"}
    with torch.device("meta"):
        hf = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(**d))
    assert sum(p.numel() for p in hf.parameters()) == count_params(cfg)["total"]


def test_cli_params_json():
    out = subprocess.run([sys.executable, "-m", "herd", "params", "scout", "--json"], capture_output=True,
                         text=True, check=True).stdout
    obj = json.loads(out)
    assert obj["total"] == PUBLISHED["scout"][0] and obj["active"] == PUBLISHED["scout"][1]
    assert isinstance(obj["total"], int)
