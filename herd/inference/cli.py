"""`herd generate`, `herd chat`, `herd quantize` (registered by add_inference_subcommands).

    herd generate MODEL --prompt "Tell me a story" [--image cat.png] [--max-new-tokens 200]
    herd generate tiny --prompt-ids "8064 10 11 12"      # random preset, no tokenizer needed
    herd chat MODEL                                       # /image PATH, /system TEXT, /reset, /exit
    herd quantize MODEL --out DIR [--bits 8|4]            # then: herd generate DIR ...

MODEL is a preset name, a herd output directory, a Hugging Face directory, or a directory
written by `herd quantize`. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


# ----- shared options ---------------------------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser, chat: bool = False) -> None:
    p.add_argument("model", help="preset name, model directory (herd / Hugging Face) or `herd quantize` output")
    p.add_argument("--tokenizer", help="tokenizer directory or file (default: the model directory's own; "
                   "'llama4' for the official one)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype: bfloat16 (default) or float32")
    p.add_argument("--bits", type=int, choices=(8, 4), help="quantize weights on the fly (int8 or int4)")
    p.add_argument("--kv-cache", choices=("auto", "int8"), default="auto",
                   help="KV cache precision of the global layers (default: the compute dtype)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per forward (default 512)")
    p.add_argument("--max-new-tokens", type=int, default=512 if chat else 256)
    p.add_argument("--temperature", type=float, default=0.6 if chat else 0.0,
                   help=f"0 = greedy (default {0.6 if chat else 0.0})")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.9 if chat else 1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--system", help="system message")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")


def _load(args):
    import torch

    from herd.inference.loading import load_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    return load_for_inference(args.model, dtype=args.dtype, bits=args.bits, tokenizer=args.tokenizer)


def _params(args, model, tok):
    from herd.inference.sampling import SamplingParams

    stop_ids = set(model.config.text.eos_token_ids)
    if tok is not None:
        stop_ids |= set(tok.stop_tokens)
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, frequency_penalty=args.frequency_penalty,
                          presence_penalty=args.presence_penalty, seed=args.seed, stop_token_ids=sorted(stop_ids),
                          stop=list(args.stop))


def _kv(args):
    return None if args.kv_cache == "auto" else args.kv_cache


def _user_content(text: str, images: list[str]):
    if not images:
        return text
    return [{"type": "image", "image": p} for p in images] + [{"type": "text", "text": text}]


def _raw_prompt(tok, text: str, images: list[str] | None, vision_config):
    """<|begin_of_text|>, each image's placeholder (as pre-training places images), then the text.
    → (ids, tiles [n_tiles, 3, S, S] or None)."""
    import torch

    from herd.chat import image_tokens
    from herd.image import VisionSettings, preprocess_image

    settings = VisionSettings.from_config(vision_config)
    ids = tok.encode("", bos=True)
    tiles = []
    for path in images or []:
        img = preprocess_image(path, settings)
        ids += image_tokens(tok, img.grid, settings.tokens_per_tile)
        tiles.append(img.tiles)
    ids += tok.encode(text, bos=False)
    return ids, (torch.cat(tiles) if tiles else None)


# ----- generate ----------------------------------------------------------------------------------------
def _cmd_generate(args) -> int:
    from herd.inference.engine import Engine
    from herd.inference.loading import require_tokenizer

    if (args.prompt is None) == (args.prompt_ids is None):
        raise ValueError("give exactly one of --prompt TEXT or --prompt-ids IDS")
    model, tok = _load(args)
    images = None
    if args.prompt_ids is not None:
        if args.image:
            raise ValueError("--image needs --prompt (the chat format places the image tokens)")
        ids = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
    else:
        tok = require_tokenizer(tok, args.model)
        if args.image and model.config.vision is None:
            raise ValueError(f"{args.model} is a text-only model; it cannot take --image")
        if args.raw:
            ids, images = _raw_prompt(tok, args.prompt, args.image, model.config.vision)
        else:
            from herd.chat import encode_messages

            msgs = ([{"role": "system", "content": args.system}] if args.system else [])
            msgs.append({"role": "user", "content": _user_content(args.prompt, args.image)})
            ids, tiles = encode_messages(tok, msgs, vision_config=model.config.vision)
            images = __import__("torch").cat(tiles) if tiles else None
    params = _params(args, model, tok)
    if params.stop and tok is None:
        raise ValueError("--stop needs a tokenizer")
    engine = Engine(model, max_batch=1, capacity=len(ids) + params.max_new_tokens, prefill_chunk=args.prefill_chunk,
                    kv_dtype=_kv(args), tokenizer=tok)
    t0 = time.perf_counter()
    engine.add(ids, params, pixel_values=images)
    out, text, reason, t_first = [], [], None, None
    stream = not args.json and tok is not None
    for ev in engine.run():
        if t_first is None:
            t_first = time.perf_counter()
        if ev.token is not None:
            out.append(ev.token)
        text.append(ev.text)
        reason = ev.finish_reason or reason
        if stream and ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    t1 = time.perf_counter()
    if args.json:
        print(json.dumps({"prompt_tokens": len(ids), "tokens": out, "text": "".join(text) if tok else None,
                          "finish_reason": reason}))
    elif stream:
        sys.stdout.write("\n")
    else:
        print(" ".join(map(str, out)))
    if args.verbose:
        dec = (len(out) - 1) / (t1 - t_first) if len(out) > 1 and t1 > t_first else float("nan")
        print(f"[{len(ids)} prompt tokens in {t_first - t0:.2f}s ({len(ids) / (t_first - t0):.0f} tok/s), "
              f"{len(out)} new tokens, decode {dec:.1f} tok/s, finish: {reason}]", file=sys.stderr)
    return 0


# ----- chat --------------------------------------------------------------------------------------------
CHAT_HELP = ("commands: /image PATH (attach to your next message), /system TEXT, /reset (forget the "
             "conversation), /exit. Ctrl-C stops the current reply; Ctrl-D or /exit quits.")


def _cmd_chat(args) -> int:
    from herd.chat import decode_assistant, encode_messages
    from herd.inference.loading import require_tokenizer
    from herd.inference.session import Session

    model, tok = _load(args)
    tok = require_tokenizer(tok, args.model)
    params = _params(args, model, tok)
    session = Session(model, tok, prefill_chunk=args.prefill_chunk, kv_dtype=_kv(args))
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages, pending = list(system), []
    print(f"herd chat: {args.model}. {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit to quit)", file=sys.stderr)
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/reset":
                messages, pending = list(system), []
                session.reset()
                print("(conversation cleared)", file=sys.stderr)
            elif cmd == "/system":
                system = [{"role": "system", "content": arg}] if arg else []
                messages = system + [m for m in messages if m["role"] != "system"]
                print("(system message set)", file=sys.stderr)
            elif cmd == "/image":
                if model.config.vision is None:
                    print(f"({args.model} is text-only: it cannot see images)", file=sys.stderr)
                elif not arg:
                    print("(usage: /image PATH)", file=sys.stderr)
                else:
                    try:
                        from herd.image import load_image

                        load_image(arg)
                        pending.append(arg)
                        print(f"(image attached: {arg})", file=sys.stderr)
                    except (OSError, ValueError) as e:
                        print(f"(cannot use {arg}: {e})", file=sys.stderr)
            elif cmd == "/help":
                print(CHAT_HELP, file=sys.stderr)
            else:
                print(f"(unknown command {cmd}; {CHAT_HELP})", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": _user_content(line, pending)})
        pending = []
        ids, tiles = encode_messages(tok, messages, vision_config=model.config.vision)
        reply: list[int] = []
        try:
            for ev in session.generate(ids, params, images=tiles):
                if ev.token is not None:
                    reply.append(ev.token)
                if ev.text:
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        msg = decode_assistant(tok, reply)
        messages.append({"role": "assistant", "content": msg.get("content", "")})


# ----- quantize ----------------------------------------------------------------------------------------
def _cmd_quantize(args) -> int:
    import shutil
    from pathlib import Path

    from herd.inference.loading import load_model, parse_dtype
    from herd.inference.quant import quantize_model, save_quantized
    from herd.tokenizer import load_tokenizer

    if Path(args.out).exists() and any(Path(args.out).iterdir()) and not args.force:
        raise ValueError(f"{args.out} exists and is not empty (use --force to write into it)")
    dtype = parse_dtype(args.dtype)
    model = load_model(args.model, dtype=dtype)
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    model = quantize_model(model, bits=args.bits, group_size=args.group_size, activations=args.activations)
    out = save_quantized(model, args.out)
    src = Path(args.model)
    if args.tokenizer:
        load_tokenizer(args.tokenizer).save(out)
    elif src.is_dir():
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
    after = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out}: int{args.bits} weights, {after / 2**20:.1f} MiB "
          f"(from {before / 2**20:.1f} MiB in {args.dtype})")
    return 0


# ----- registration ------------------------------------------------------------------------------------
def add_inference_subcommands(subparsers) -> None:
    """Register `generate`, `chat` and `quantize` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "generate", help="generate text from a prompt (streams to stdout)",
        description="Generate a reply to one prompt, streaming text as it is produced. By default the prompt is "
        "wrapped in the Llama 4 chat format as a user message (images attached with --image); --raw encodes it "
        "as plain text after <|begin_of_text|>; --prompt-ids takes token ids and needs no tokenizer (random presets).")
    _add_model_args(p)
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt-ids",
                   help="prompt as token ids, e.g. '1 2 3' (prints token ids unless a tokenizer is found)")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="attach an image (repeatable)")
    p.add_argument("--raw", action="store_true", help="plain completion instead of the chat format: <|begin_of_text|>, the --image placeholders, then the prompt (the pre-training layout)")
    p.add_argument("--json", action="store_true", help="print one JSON object (tokens, text, finish_reason)")
    p.add_argument("--verbose", "-v", action="store_true", help="print timing to stderr")
    p.set_defaults(func=_cmd_generate)

    p = subparsers.add_parser(
        "chat", help="interactive multi-turn chat (streaming, images, Ctrl-C stops a reply)",
        description="Chat with a model in the terminal. Each turn reuses the conversation's KV cache, so only the "
        "new message is prefilled. " + CHAT_HELP)
    _add_model_args(p, chat=True)
    p.set_defaults(func=_cmd_chat)

    p = subparsers.add_parser(
        "quantize", help="write a weight-only int8/int4 copy of a model",
        description="Quantize the linear and expert weights of a model (int8 per output channel, or int4 in groups) "
        "and write a directory that `herd generate` / `herd chat` load directly. Embeddings, norms, routers and "
        "the vision tower keep --dtype.")
    p.add_argument("model", help="preset name or model directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--bits", type=int, choices=(8, 4), default=8, help="8 (default) or 4")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size: 32, 64, 128 or 256 (default 64)")
    p.add_argument("--dtype", default="bfloat16", help="dtype of what is not quantized (default bfloat16)")
    p.add_argument("--activations", choices=("int8",), help="int8 only: decode also quantizes activations to int8 "
                   "(per block of 64 on herd's native kernel, per row in fbgemm's for batches; ~0.5%% "
                   "error per product; on this project's machine no faster than weight-only int8 "
                   "with the native kernels)")
    p.add_argument("--tokenizer", help="tokenizer to copy into the output directory")
    p.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    p.set_defaults(func=_cmd_quantize)
