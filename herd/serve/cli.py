"""`herd serve MODEL`: the OpenAI-compatible server and chat UI (registered by add_serve_subcommand).

    herd serve runs/tiny                          # http://127.0.0.1:8000  (UI at /, API at /v1)
    herd serve runs/tiny --api-key sk-local --max-batch 32 --port 9000
    herd serve DIR --guards guards.json           # the safety pipeline in front of and behind the model

The HTTP server starts at once and answers /health with 503 while the model loads in the
background, then 200. Ctrl-C stops it. Heavy imports happen inside the command.
"""

from __future__ import annotations

import argparse
import sys
import threading


def _cmd_serve(args) -> int:
    import logging

    import uvicorn

    from herd.serve.app import Settings, create_app
    from herd.serve.guards import load_guards

    if args.prefix_cache_mb < 0:
        raise ValueError(f"--prefix-cache-mb must be ≥ 0, got {args.prefix_cache_mb}")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be ≥ 1, got {args.max_batch}")
    if not 1 <= args.port <= 65535 and args.port != 0:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    guards = load_guards(args.guards) if args.guards else None
    settings = Settings(model_name=args.served_model_name or args.model, api_key=args.api_key,
                        max_model_len=args.max_model_len, ui=not args.no_ui, guards=guards,
                        max_queue=args.max_queue)
    app = create_app(settings)
    failed: list[BaseException] = []

    def load():
        import herd
        import torch

        from herd.inference.loading import load_for_inference, require_tokenizer

        try:
            if args.threads:
                torch.set_num_threads(args.threads)
            model, tok = load_for_inference(args.model, dtype=args.dtype, bits=args.bits, tokenizer=args.tokenizer)
            require_tokenizer(tok, args.model)
            engine = herd.Engine(model, max_batch=args.max_batch, max_seq_len=args.max_model_len, tokenizer=tok,
                                 prefill_chunk=args.prefill_chunk, prefix_cache_bytes=int(args.prefix_cache_mb * 2**20))
            app.state.server.attach(engine)
            print(f"herd serve: {args.model} ready on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
        except BaseException as e:  # noqa: BLE001 - reported, then the server stops
            failed.append(e)
            server.should_exit = True

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
    server = uvicorn.Server(config)
    threading.Thread(target=load, name="herd-load", daemon=True).start()
    server.run()
    app.state.server.close()
    if failed:
        err = failed[0]
        if isinstance(err, (ValueError, FileNotFoundError)):
            raise err
        raise RuntimeError(f"loading {args.model} failed: {err}") from err
    return 0


def add_serve_subcommand(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server with continuous batching and a web chat UI",
        description="Serve a model over HTTP: /v1/chat/completions (text, images, tools, streaming), "
        "/v1/completions (echo + prompt logprobs), /v1/models, /v1/moderations (--guards), /tokenize, "
        "/detokenize, /health, /metrics, and the chat UI at /.")
    p.add_argument("model", help="preset name, model directory (herd / Hugging Face) or `herd quantize` output")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on the API (default: no key)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--max-queue", type=int, default=256, help="sequences that may wait for a row; beyond: 429")
    p.add_argument("--max-model-len", type=int, default=4096, help="prompt + completion tokens per sequence")
    p.add_argument("--guards", metavar="CONFIG", help="safety pipeline config file (herd.safety)")
    p.add_argument("--no-ui", action="store_true", help="do not serve the chat page at /")
    p.add_argument("--served-model-name", help="model id reported by /v1/models (default: MODEL as given)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory's own)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default) or float32")
    p.add_argument("--bits", type=int, choices=(8, 4), help="quantize weights on the fly")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per forward (default 512)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--prefix-cache-mb", type=float, default=256, help="memory for finished conversations' KV rows, "
                   "reused when a follow-up request extends one (default 256; 0: off)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=_cmd_serve)
    return p
