"""`herd train` with the tiny preset made dense (moe_layers=[]: every layer a plain SwiGLU MLP).

The 2-rank trajectory test runs this under torchrun and in one process. A routed model is the
wrong subject for comparing trajectories across execution orders: the two runs reduce gradients
in different orders, AdamW's first update turns last-bit differences of near-zero gradients into
full ±lr steps, and a top-1 router then sends a few tokens to other experts, so steps 2 and later
differ by an amount that depends on the CPU, not on correctness. Without routing the trajectory is
smooth and the runs agree tightly; the routed model's first step is compared on its own.

    torchrun --nproc_per_node 2 tests/train/dense_train.py train --preset tiny ...
"""

from __future__ import annotations

import sys

from herd import presets

_tiny = presets.PRESETS["tiny"]


def dense_tiny():
    cfg = _tiny()
    cfg.text.moe_layers = []
    return cfg


if __name__ == "__main__":
    presets.PRESETS["tiny"] = dense_tiny
    from herd.cli import main

    sys.exit(main(sys.argv[1:]))
