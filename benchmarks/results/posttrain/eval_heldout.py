"""Held-out accuracy and end-of-turn rate per task of one model directory (issue 12's before SFT /
after SFT / after DPO table): benchmarks/sft_pruning.py's `evaluate` on runs/sft_data/test.jsonl,
greedy, 24 new tokens, at most N items per task.

    python benchmarks/results/posttrain/eval_heldout.py MODEL_DIR OUT.json [N]
"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import torch; torch.set_num_threads(1)
from sft_pruning import evaluate
run, out = sys.argv[1], sys.argv[2]
t0 = time.time()
r = evaluate(Path(run), Path("runs/sft_data/test.jsonl"), 24, int(sys.argv[3]) if len(sys.argv) > 3 else 20)
Path(out).write_text(json.dumps({"model": run, "max_new": 24, "tasks": r, "wall_s": round(time.time()-t0, 1)}, indent=2) + "\n")
print(json.dumps(r, indent=1))
