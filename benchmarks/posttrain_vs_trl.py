"""SFT and DPO training steps: herd against TRL (SFTTrainer, DPOTrainer) on the same model and data.

    python benchmarks/posttrain_vs_trl.py --steps 20            # idle machine: the figures
    python benchmarks/posttrain_vs_trl.py --smoke               # seconds: checks the script runs

Model: the tiny preset without its vision tower (TRL trains transformers' Llama4ForCausalLM),
random weights, saved once as a Hugging Face directory that both load. Data: prompt/completion
pairs built from herd's SFT data generators (chain_sum, calculator-style arithmetic) as text.

  * SFT: herd packs the examples into rows of --seq-len (document masks, restarting positions)
    and runs its fused LM-head loss; TRL pads each batch (SFTTrainer's collator, completion-only
    loss). Figure: trained (non-padding) tokens per second, the same examples per step.
  * DPO: one step on the same collated pairs (TRL's collator builds the batch; herd runs its
    objective on those ids with reference log-probs precomputed, as `herd dpo` does; TRL with
    precompute_ref_log_probs=True likewise). Figure: seconds per step.

Both sides: fp32 weights and math (--bf16: both under bf16 autocast), AdamW, same batch, torch threads = --threads, steps alternate herd/TRL
so load drifts hit both. Ratios > 1 mean herd is faster. The issue's goal: ≥ 4× each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_model(root: Path, smoke: bool):
    import herd
    from herd.data import training_texts
    from herd.tokenizer_train import train_tokenizer

    out = root / "model"
    if not (out / "config.json").exists():
        texts = [t for _, t in zip(range(40 if smoke else 200), training_texts(limit=20 if smoke else 60))]
        train_tokenizer(texts, herd.get_config("tiny").text.vocab_size, out)
        cfg = herd.get_config("tiny")
        cfg.vision = None
        herd.save_model(herd.build_model(cfg, seed=0), out)
    return out


def rows(n: int) -> list[dict]:
    import random

    rng = random.Random(0)
    out = []
    for i in range(n):
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        out.append({"prompt": f"What is {a} + {b}? Think step by step.",
                    "completion": f"First {a}, then add {b}: the sum of {a} and {b} is {a + b}.",
                    "rejected": f"I believe {a} plus {b} is {a + b + rng.randint(1, 9)}, more or less."})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16, help="examples (SFT) / pairs (DPO) per step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/posttrain_vs_trl")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="both sides under bf16 autocast (fp32 weights; herd's "
                                                        "training default) instead of fp32")
    ap.add_argument("--profile", action="store_true", help="torch.profiler tables of 3 steps of each side "
                                                           "(OUT/profile_*.txt) instead of timing")
    ap.add_argument("--profile-steps", default="herd_sft,trl_sft,herd_dpo,trl_dpo", help="which steps --profile profiles")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.batch = 2, 4
    import torch

    torch.set_num_threads(args.threads)
    import contextlib

    def precision():  # the same for both sides: fp32, or bf16 autocast over fp32 weights
        return torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    import trl
    from datasets import Dataset
    from transformers import Llama4ForCausalLM, PreTrainedTokenizerFast

    import herd
    from herd.train.chat_rows import Example, encode_dialog, pack_rows
    from herd.train.dpo import DPOLoss, PairBatch, completion_logps
    from herd.train.sft import MaskedNextTokenLoss

    root = Path(args.out)
    model_dir = make_model(root, args.smoke)
    tok = herd.load_tokenizer(model_dir)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"),
                                     pad_token="<|finetune_right_pad|>", eos_token="<|eot|>")
    data = rows(args.batch)

    def hf_model():
        m = Llama4ForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
        object.__setattr__(m, "language_model", m.model)  # TRL's fused head reaches the backbone as base_model
        return m

    # ----- SFT ------------------------------------------------------------------------------------
    sft_args = trl.SFTConfig(output_dir=str(root / "trl_sft"), report_to=[], use_cpu=True, bf16=False,
                             per_device_train_batch_size=args.batch, max_length=args.seq_len,
                             completion_only_loss=True, router_aux_loss_coef=0.0)
    trl_sft = trl.SFTTrainer(model=hf_model(), args=sft_args, processing_class=hf_tok,
                             train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                                              for r in data]))
    sft_batch = trl_sft.data_collator([trl_sft.train_dataset[i] for i in range(args.batch)])
    trl_tokens = int(sft_batch["attention_mask"].sum())
    trl_opt = torch.optim.AdamW(trl_sft.model.parameters(), lr=1e-4)

    examples = []
    for r in data:
        ids, mask, _ = encode_dialog(tok, [{"role": "user", "content": r["prompt"]},
                                           {"role": "assistant", "content": r["completion"]}])
        examples.append(Example(str(len(examples)), ids, mask, []))
    packed = pack_rows(examples, args.seq_len, 0)
    herd_tokens = sum(len(e.ids) for e in examples)
    model = herd.load_model(model_dir)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    sft_obj = MaskedNextTokenLoss(torch.device("cpu"))

    def herd_sft_step():
        with precision():
            loss, n, _ = sft_obj(model, packed)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def trl_sft_step():
        trl_sft.model.train()
        with precision():
            loss = trl_sft.compute_loss(trl_sft.model, dict(sft_batch))
        loss.backward()
        trl_opt.step()
        trl_opt.zero_grad(set_to_none=True)

    # ----- DPO ------------------------------------------------------------------------------------
    dpo_args = trl.DPOConfig(output_dir=str(root / "trl_dpo"), report_to=[], use_cpu=True, bf16=False, beta=0.1,
                             per_device_train_batch_size=args.batch, precompute_ref_log_probs=False,
                             router_aux_loss_coef=0.0)
    trl_dpo = trl.DPOTrainer(model=hf_model(), args=dpo_args, processing_class=hf_tok,
                             train_dataset=Dataset.from_list([{"prompt": r["prompt"], "chosen": r["completion"],
                                                               "rejected": r["rejected"]} for r in data]))
    if trl_dpo.ref_model is not None:
        object.__setattr__(trl_dpo.ref_model, "language_model", trl_dpo.ref_model.model)
    dpo_batch = trl_dpo.data_collator([trl_dpo.train_dataset[i] for i in range(args.batch)])
    with torch.no_grad():  # TRL with precomputed reference log-probs reads them from the batch
        ref_sums, _ = completion_logps(model(dpo_batch["input_ids"]), dpo_batch["input_ids"],
                                       dpo_batch["completion_mask"])
    b = args.batch
    dpo_batch["ref_chosen_logps"], dpo_batch["ref_rejected_logps"] = ref_sums[:b], ref_sums[b:]
    trl_dpo.precompute_ref_logps = True
    trl_dpo_opt = torch.optim.AdamW(trl_dpo.model.parameters(), lr=1e-4)
    herd_pairs = PairBatch(dpo_batch["input_ids"], dpo_batch["completion_mask"], None,  # TRL's collated ids
                           ref_sums[:b], ref_sums[b:], list(range(b)))
    dpo_obj = DPOLoss(torch.device("cpu"))

    def herd_dpo_step():
        with precision():
            loss, n, _ = dpo_obj(model, herd_pairs)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def trl_dpo_step():
        trl_dpo.model.train()
        with precision():
            loss = trl_dpo._compute_loss(trl_dpo.model, dict(dpo_batch), return_outputs=False)
        loss.backward()
        trl_dpo_opt.step()
        trl_dpo_opt.zero_grad(set_to_none=True)

    times = {k: [] for k in ("herd_sft", "trl_sft", "herd_dpo", "trl_dpo")}
    steps = {"herd_sft": herd_sft_step, "trl_sft": trl_sft_step, "herd_dpo": herd_dpo_step, "trl_dpo": trl_dpo_step}
    for name, fn in steps.items():  # warm-up
        fn()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in steps.items():
            if name not in args.profile_steps.split(","):
                continue
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    fn()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            (root / f"profile_{name}.txt").write_text(table)
            print(f"----- {name} (3 steps)\n{table}")
        return 0
    for _ in range(args.steps):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"machine threads {args.threads}, {args.steps} steps each, batch {args.batch}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'} both sides")
    print(f"SFT tokens/s: herd {herd_tokens / med['herd_sft']:,.0f} ({packed.input_ids.shape[0]} packed rows) | "
          f"TRL {trl_tokens / med['trl_sft']:,.0f} ({sft_batch['input_ids'].shape} padded) | "
          f"ratio {herd_tokens / med['herd_sft'] / (trl_tokens / med['trl_sft']):.2f}×")
    print(f"DPO s/step: herd {med['herd_dpo']:.3f} | TRL {med['trl_dpo']:.3f} | ratio {med['trl_dpo'] / med['herd_dpo']:.2f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
