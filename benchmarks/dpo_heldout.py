"""Does DPO raise the preference margin on pairs it never trained on? TRL's reward metrics of a DPO
model against its reference (the model DPO started from) on held-out on-policy pairs.

    python benchmarks/dpo_heldout.py --ref runs/speedrun/rl --policy runs/speedrun/dpo \
        --data runs/speedrun/sft_data/test.jsonl --limit 64 --result benchmarks/results/dpo.json
    python benchmarks/dpo_heldout.py --smoke          # seconds: a random tiny model, checks the script

Held-out pairs are built exactly as `herd dpo pairs` builds the training pairs (herd.train.dpo.
build_pairs: sample the reference model k times on each verifiable prompt, chosen = a verified-
correct reply or, with no correct one, the reference answer; rejected = a wrong reply), but from
the held-out test split, whose prompts no training stage saw. For every pair, with β as in
training (0.1) and log π summing the completion tokens' log-probs:

    reward_chosen = β·(log π(y_w|x) − log π_ref(y_w|x)),   reward_rejected likewise on y_l
    rewards/accuracies = mean[reward_chosen > reward_rejected]   (TRL's eval metric)

Before DPO the policy *is* the reference: every reward is 0 and the accuracy 0 (ties count as
misses, as in TRL). The report card's claim (herd.evals.report.CLAIMS): held-out
rewards/accuracies above 0.5 after DPO; margin = accuracy − 0.5.

Writes OUT/pairs.jsonl, OUT/metrics.json and, with --result, the report-card JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def logps(model_dir: Path, pairs_path: Path, max_len: int):
    """[n, 2] summed completion log-probs (chosen, rejected) of model_dir on the pairs, float32, eval mode."""
    import torch

    from herd.train.chat_rows import BadLines
    from herd.train.dpo import compute_ref_logps, load_pairs
    from herd.train.loop import init_from

    model, tok = init_from(model_dir)
    pad = tok.special_tokens.get("<|finetune_right_pad|>", tok.special_tokens["<|eot|>"])
    pairs = load_pairs(pairs_path, tok, model.config.vision, max_len, BadLines(True))
    return compute_ref_logps(model, pairs, pad, torch.device("cpu"), bf16=False, progress=False), len(pairs)


def metrics(policy, ref, beta: float) -> dict:
    """TRL's reward metrics (means over pairs) from [n, 2] log-prob tables."""
    rc, rr = beta * (policy[:, 0] - ref[:, 0]), beta * (policy[:, 1] - ref[:, 1])
    return {"rewards/chosen": float(rc.mean()), "rewards/rejected": float(rr.mean()),
            "rewards/margins": float((rc - rr).mean()), "rewards/accuracies": float((rc > rr).double().mean()),
            "logps/chosen": float(policy[:, 0].mean()), "logps/rejected": float(policy[:, 1].mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", help="the model DPO started from (its --init)")
    ap.add_argument("--policy", help="the DPO run directory")
    ap.add_argument("--data", help="held-out messages JSONL with verifiable rows (herd data sft's test.jsonl)")
    ap.add_argument("--out", default="runs/dpo_heldout")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt when building pairs")
    ap.add_argument("--limit", type=int, default=64, help="verifiable prompts to build pairs from")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--result", default=None, help="report-card JSON (e.g. benchmarks/results/dpo.json)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="random tiny model as both sides, 4 prompts")
    args = ap.parse_args()
    import torch

    from herd.train.dpo import build_pairs

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out if not args.smoke else "runs/dpo_heldout_smoke")
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        from benchmarks.sft_pruning import smoke_assets

        ref_dir, data = smoke_assets(out)
        args.ref, args.policy, args.data, args.limit, args.k = str(ref_dir), str(ref_dir), str(data / "test.jsonl"), 4, 2
    elif not (args.ref and args.policy and args.data):
        ap.error("--ref, --policy and --data are required (or --smoke)")
    counts = build_pairs(args.ref, args.data, out, k=args.k, limit=args.limit, use_reference=True,
                         progress=not args.smoke)
    ref, n = logps(Path(args.ref), out / "pairs.jsonl", args.max_len)
    policy, _ = logps(Path(args.policy), out / "pairs.jsonl", args.max_len)
    before, after = metrics(ref, ref, args.beta), metrics(policy, ref, args.beta)
    result = {"setup": {**vars(args), "pairs": n, "pair_counts": counts}, "before": before, "after": after}
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if args.result:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = None
        acc = after["rewards/accuracies"]
        card = {"claim": {"pass": acc > 0.5, "margin": round(acc - 0.5, 4), "smoke": args.smoke,
                          "statement": "held-out rewards/accuracies of the DPO model against its reference > 0.5"},
                "commit": commit, **result}
        Path(args.result).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result).write_text(json.dumps(card, indent=2) + "\n")
        print(f"claim: {card['claim']} → {args.result}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
