"""herd's server against llama.cpp's OpenAI-compatible server: aggregate tokens/s and time to first
token (p50 / p99) at 1, 8, 32 and 64 concurrent streams, one run, same model, same requests.

    # herd only, a tiny random model (a smoke run, seconds):
    python benchmarks/serve.py --smoke
    # side by side (outside CI): the random 552M / 123M-active model and GGUF of
    # scripts/llamacpp_side_by_side.sh (CONVERT_ONLY=1 makes the files), and llama-server built from
    # the same llama.cpp tree:  cmake -S $LCPP -B $LCPP/build -DLLAMA_BUILD_SERVER=ON ... &&
    #                           cmake --build $LCPP/build --target llama-server -j 2
    python benchmarks/serve.py --model /tmp/herd-llamacpp/model-hf --llama-server $LCPP/build/bin/llama-server \
        --gguf /tmp/herd-llamacpp/model-bf16.gguf --threads 2
    # a chat's follow-up turn (turn 1 sent 5 images): TTFT cold, with the image features cached, and
    # with turn 1's KV rows reused from the engine's prefix store (the server's default)
    python benchmarks/serve.py --turn2 [--model runs/tiny] --threads 2
    # the engine's decode step at batch 1, 8, 32: the batched step (herd.inference.batched) against the
    # general forward, wall and CPU ms per step, then where the batched step spends its time
    # (torch.profiler, 1 thread: op shares stay meaningful on a busy machine; --smoke: decode.py's
    # quick model instead of 552M)
    python benchmarks/serve.py --profile-engine [--smoke] --batches 1 8 32 --threads 1
    # the load round without the server (C prompts at once into one Engine, run to the end): the
    # engine's steps against the general forward, tokens/s by wall and by CPU time
    python benchmarks/serve.py --engine-round --concurrency 32 --threads 1 [--smoke]

Both servers get identical requests through the same endpoint, POST /v1/completions with
`stream: true`, the prompt as token ids (so no tokenizer is involved: the random model has none
that llama.cpp and herd share), `max_tokens` new tokens and `ignore_eos`, greedy. Each of C
concurrent clients sends one request; TTFT is the time from sending to the first streamed chunk,
tokens are counted from the final usage chunk (stream_options.include_usage);
aggregate tokens/s = all generated tokens / wall time of the round. Each server runs as its own
process with the same thread count, one at a time (never both at once), and the rounds alternate
herd / llama.cpp per concurrency level. Goals (issue 15): ≥ 1.0× llama.cpp at concurrency 1,
≥ 2× at 32; herd at 32 streams ≥ 4× its single-stream rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout} s")


async def one_stream(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int, model: str):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            if "error" in c:  # an error event after the stream started: a broken run, not a slow one
                raise RuntimeError(f"{url}: {c['error'].get('message')}")
            if c.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            if c.get("usage"):
                usage = c["usage"]["completion_tokens"]
    return ttft if ttft is not None else float("nan"), usage


async def load(url: str, concurrency: int, prompt_len: int, max_tokens: int, vocab: int, model: str) -> dict:
    prompts = [[(7919 * (i + 1) * (j + 3)) % (vocab - 1000) + 500 for j in range(prompt_len)]
               for i in range(concurrency)]
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*[one_stream(client, url, p, max_tokens, model) for p in prompts])
        wall = time.perf_counter() - t0
    ttfts = sorted(t for t, _ in res)
    total = sum(n for _, n in res)
    return {"concurrency": concurrency, "tokens": total, "wall_s": wall, "tok_s": total / wall,
            "ttft_p50_ms": 1e3 * statistics.median(ttfts),
            "ttft_p99_ms": 1e3 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]}


def start_herd(model_dir: str, tokenizer: str, threads: int, max_batch: int, max_len: int, dtype: str):
    port = free_port()
    cmd = [sys.executable, "-m", "herd", "serve", model_dir, "--tokenizer", tokenizer, "--port", str(port),
           "--max-batch", str(max_batch), "--max-model-len", str(max_len), "--threads", str(threads),
           "--dtype", dtype, "--no-ui", "--served-model-name", "bench"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), f"http://127.0.0.1:{port}"


def start_llama(server: str, gguf: str, threads: int, slots: int, max_len: int):
    port = free_port()
    cmd = [server, "-m", gguf, "-t", str(threads), "--port", str(port), "-np", str(slots), "-c", str(slots * max_len),
           "--cont-batching", "--no-webui"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def smoke_model(tmp: Path) -> tuple[str, str, int]:
    """A tiny random text model + a tokenizer trained to its vocab (for --smoke)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import herd
    from herd.tokenizer_train import train_tokenizer
    from tests.conftest import model_config

    cfg = model_config(vision=False, text=dict(intermediate_size=64, intermediate_size_mlp=128))
    herd.save_model(herd.build_model(cfg, seed=0), tmp / "model")
    train_tokenizer(["The quick brown fox jumps over the lazy dog. " * 50], 512, tmp / "tok")
    return str(tmp / "model"), str(tmp / "tok"), cfg.text.vocab_size


def turn2(args) -> None:
    """TTFT of a chat's follow-up turn (the whole conversation resent, turn 1 with --images images),
    three ways in turns, median of --rounds: cold (nothing cached: encode the images, prefill it all),
    images cached (the server's feature cache; the whole history prefilled again), and prefix reused
    (turn 1's KV rows from the engine's prefix store, as `herd serve` runs by default: only turn 1's
    reply tail and the new user message are prefilled)."""
    import threading

    import torch
    import uvicorn

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import herd
    from herd.inference.loading import load_for_inference
    from herd.serve import Settings, create_app
    from herd.tokenizer_train import train_tokenizer
    from tests.serve.conftest import png_data_url

    torch.set_num_threads(args.threads)
    model, tok = load_for_inference(args.model or "tiny", dtype=args.dtype, tokenizer=args.tokenizer)
    if tok is None:
        tok = train_tokenizer(["The quick brown fox jumps over the lazy dog. " * 50], model.config.text.vocab_size,
                              Path(tempfile.mkdtemp()) / "tok")
    engine = herd.Engine(model, max_batch=4, max_seq_len=8192, tokenizer=tok, prefix_cache_bytes=256 << 20)
    app = create_app(Settings(model_name="bench"), engine)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    images = [{"type": "image_url", "image_url": {"url": png_data_url(i, (200, 300))}} for i in range(args.images)]
    turn1 = [{"role": "user", "content": [{"type": "text", "text": "What is in these pictures?"}, *images]}]
    body1 = {"messages": turn1, "max_tokens": 16, "temperature": 0}
    r1 = httpx.post(url + "/v1/chat/completions", json=body1, timeout=None).json()
    conv = turn1 + [r1["choices"][0]["message"], {"role": "user", "content": "And in the second one?"}]

    def ttft() -> float:
        t0 = time.perf_counter()
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=None,
                          json={"messages": conv, "max_tokens": 1, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content": ""' not in line:
                    return time.perf_counter() - t0
        return float("nan")

    def forget(features: bool) -> None:  # between requests: the engine thread is idle
        engine.prefix.clear()
        if features:
            app.state.server._features.clear()

    cold, images, prefix = [], [], []
    hits0, reused0 = engine.prefix.hits, engine.prefix.reused_tokens
    for _ in range(args.rounds):
        forget(features=True)
        cold.append(ttft())
        forget(features=False)
        images.append(ttft())
        forget(features=True)
        httpx.post(url + "/v1/chat/completions", json=body1, timeout=None)  # turn 1 again: its rows are kept
        prefix.append(ttft())
    reused = (engine.prefix.reused_tokens - reused0) / max(1, engine.prefix.hits - hits0)
    srv.should_exit = True
    app.state.server.close()
    c, i, p = statistics.median(cold), statistics.median(images), statistics.median(prefix)
    print(f"turn 2 ({args.images} images, turn 1 {r1['usage']['prompt_tokens']} prompt tokens): TTFT cold "
          f"{1e3 * c:.1f} ms, images cached {1e3 * i:.1f} ms ({c / i:.2f}×), prefix reused {1e3 * p:.1f} ms "
          f"({c / p:.2f}× cold; {reused:.0f} tokens reused per turn 2), median of {args.rounds}")


PRODUCT_OPS = ("gemv", "linear_pointwise", "aten::mv", "aten::mm", "aten::addmm", "aten::linear", "aten::bmm",
               "_weight_int8pack_mm", "_weight_int4pack_mm", "linear_dynamic")


def profile_engine(args) -> None:
    """For each B of --batches: herd.Engine with B rows decoding (greedy, rows at different positions
    as continuous batching leaves them), the batched decode step (herd.inference.batched) against the
    general forward, --repeats alternating rounds of --rounds steps each (ms per step by wall clock
    and by the process's CPU time: on a busy machine the CPU time is the steadier of the two); then
    torch.profiler over the batched step: the top ops by self time and the split products (weight
    streaming) / other ops / outside ops (Python, engine)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import herd
    from decode import model_config
    from herd.inference.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    model = herd.build_model(model_config(args.smoke), dtype=torch.bfloat16, seed=0)
    print(f"model: decode.py's {'quick' if args.smoke else '552M / 123M-active'} config, bf16, {args.threads} thread(s)")
    results = []
    for B in args.batches:
        engines = {}
        for name in ("general", "batched"):
            engine = herd.Engine(model, max_batch=B, batch_step=name == "batched")
            for i in range(B):
                engine.add([(7919 * (i + 1) * (j + 3)) % 1000 + 10 for j in range(args.prompt_tokens)],
                           SamplingParams(max_new_tokens=10 ** 6, stop_token_ids=[]))
            while len(engine.active) < B:
                engine.step()  # one prefill per step: the rows end up at B different positions
            for _ in range(3):
                engine.step()
            engines[name] = engine
        times = {name: ([], []) for name in engines}
        for _ in range(args.repeats):  # alternate, so that a change of load hits both alike
            for name, engine in engines.items():
                w, c = time.perf_counter(), time.process_time()
                for _ in range(args.rounds):
                    engine.step()
                times[name][0].append((time.perf_counter() - w) / args.rounds)
                times[name][1].append((time.process_time() - c) / args.rounds)
        row = {"batch": B, "threads": args.threads}
        for name, (wall, cpu) in times.items():
            row[f"{name}_ms"] = 1e3 * statistics.median(wall)
            row[f"{name}_cpu_ms"] = 1e3 * statistics.median(cpu)
        results.append(row)
        print(f"\n=== batch {B}: general forward {row['general_ms']:.1f} ms per step (CPU {row['general_cpu_ms']:.1f}), "
              f"batched step {row['batched_ms']:.1f} ms (CPU {row['batched_cpu_ms']:.1f}): "
              f"{row['general_ms'] / row['batched_ms']:.2f}× by wall, {row['general_cpu_ms'] / row['batched_cpu_ms']:.2f}× "
              f"by CPU; {B / row['batched_ms'] * 1e3:.1f} tokens/s (medians of {args.repeats} × {args.rounds} steps)")
        engine = engines["batched"]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            for _ in range(args.rounds):
                engine.step()
            wall = (time.perf_counter() - t) * 1e6
        events = prof.key_averages()
        in_ops = sum(e.self_cpu_time_total for e in events)
        products = sum(e.self_cpu_time_total for e in events if any(p in e.key for p in PRODUCT_OPS))
        print(events.table(sort_by="self_cpu_time_total", row_limit=15))
        print(f"batch {B} (batched step): products {products / wall:.0%} + other ops {(in_ops - products) / wall:.0%} "
              f"+ outside ops {max(0.0, 1 - in_ops / wall):.0%} of the step's wall time (profiler on)")
        del engines
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


def engine_round(args) -> None:
    """The server benchmark's round without the server: for each C of --concurrency, C prompts of
    --prompt-tokens (the same token ids) and --max-tokens new tokens each (greedy, no stop), all
    added at once to one herd.Engine as `herd serve` builds it (max_batch C, prefill_chunk 512, prefix
    store on) and run to the end; the engine's steps as they are now (one forward for decode rows and
    prompt segments, herd.inference.batched) against the general forward with one forward per prompt
    segment (batch_step=False), the two engines stepped in turn, --repeats rounds: generated tokens per
    second of each engine's own steps, by wall clock and by CPU time."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import herd
    from decode import model_config
    from herd.inference.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    if args.model:
        model = herd.load_model(args.model, dtype=torch.bfloat16)
    else:
        model = herd.build_model(model_config(args.smoke), dtype=torch.bfloat16, seed=0)
    vocab = model.config.text.vocab_size
    results = []
    for C in args.concurrency:
        prompts = [[(7919 * (i + 1) * (j + 3)) % (vocab - 1000) + 500 for j in range(args.prompt_tokens)]
                   for i in range(C)]
        engines = {name: herd.Engine(model, max_batch=C, max_seq_len=args.prompt_tokens + args.max_tokens + 8,
                                     prefill_chunk=512, prefix_cache_bytes=256 << 20, batch_step=name == "batched")
                   for name in ("general", "batched")}
        times = {name: ([], []) for name in engines}
        for rep in range(args.repeats + 1):  # a short first round warms up (oneDNN builds its kernels)
            spent = {name: [0.0, 0.0, 0] for name in engines}  # wall s, CPU s, tokens
            for engine in engines.values():
                for p in prompts:
                    engine.add(p, SamplingParams(max_new_tokens=args.max_tokens if rep else 4, stop_token_ids=[]))
            while any(e.has_work() for e in engines.values()):  # step by step in turn: the same load for both
                for name, engine in engines.items():
                    if engine.has_work():
                        w, c = time.perf_counter(), time.process_time()
                        events = engine.step()
                        spent[name][0] += time.perf_counter() - w
                        spent[name][1] += time.process_time() - c
                        spent[name][2] += sum(ev.token is not None for ev in events)
            for name, engine in engines.items():
                engine.prefix.clear()  # the next round's identical prompts must prefill again
                if rep:
                    times[name][0].append(spent[name][2] / spent[name][0])
                    times[name][1].append(spent[name][2] / spent[name][1])
        row = {"concurrency": C, "threads": args.threads}
        for name, (wall, cpu) in times.items():
            row[f"{name}_tok_s"] = statistics.median(wall)
            row[f"{name}_tok_cpu_s"] = statistics.median(cpu)
        results.append(row)
        print(f"C={C}: general {row['general_tok_s']:.1f} tok/s ({row['general_tok_cpu_s']:.1f} per CPU-s), "
              f"batched {row['batched_tok_s']:.1f} tok/s ({row['batched_tok_cpu_s']:.1f} per CPU-s): "
              f"{row['batched_tok_s'] / row['general_tok_s']:.2f}× by wall, "
              f"{row['batched_tok_cpu_s'] / row['general_tok_cpu_s']:.2f}× by CPU", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF directory of the model (herd side)")
    ap.add_argument("--tokenizer", help="tokenizer directory for herd serve (default: train a byte-level one)")
    ap.add_argument("--llama-server", help="path of llama.cpp's llama-server binary (omit: herd only)")
    ap.add_argument("--gguf", help="the same model as GGUF (llama.cpp side)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, herd only, small settings")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--turn2", action="store_true", help="TTFT of a follow-up turn with cached vs new images "
                    "(in-process server; --model default: the tiny preset, random weights)")
    ap.add_argument("--profile-engine", action="store_true", help="per-op profile of the engine's decode step "
                    "at --batches (no server; --smoke: the quick model)")
    ap.add_argument("--engine-round", action="store_true", help="the load round in-process, no server: the "
                    "engine's steps against the general forward (--concurrency, --prompt-tokens, --max-tokens)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="--profile-engine: alternating rounds per step kind")
    args = ap.parse_args()
    if args.turn2:
        return turn2(args)
    if args.profile_engine:
        return profile_engine(args)
    if args.engine_round:
        return engine_round(args)
    tmp = Path(tempfile.mkdtemp(prefix="herd-serve-bench-"))
    if args.smoke:
        args.model, args.tokenizer, vocab = smoke_model(tmp)
        args.concurrency, args.prompt_tokens, args.max_tokens, args.dtype = [1, 8], 16, 16, "float32"
    else:
        if not args.model:
            ap.error("--model is required (or --smoke)")
        vocab = json.loads((Path(args.model) / "config.json").read_text()).get("vocab_size") or \
            json.loads((Path(args.model) / "config.json").read_text())["text_config"]["vocab_size"]
        if not args.tokenizer:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from herd.tokenizer_train import train_tokenizer

            # the model's own vocabulary size (filler tokens pad it): the server decodes every id it generates
            train_tokenizer(["The quick brown fox jumps over the lazy dog. " * 50], vocab, tmp / "tok")
            args.tokenizer = str(tmp / "tok")
    max_c = max(args.concurrency)
    max_len = args.prompt_tokens + args.max_tokens + 8
    sides = [("herd", lambda: start_herd(args.model, args.tokenizer, args.threads, max_c, max_len, args.dtype))]
    if args.llama_server:
        if not args.gguf:
            ap.error("--llama-server needs --gguf")
        sides.append(("llama.cpp", lambda: start_llama(args.llama_server, args.gguf, args.threads, max_c, max_len)))
    rows = []
    print(f"machine: {os.cpu_count()} CPUs, {args.threads} threads per server; prompt {args.prompt_tokens} tokens, "
          f"{args.max_tokens} new, greedy, ignore_eos")
    for c in args.concurrency:
        for name, start in sides:  # one server at a time, alternating per concurrency level
            proc, url = start()
            try:
                wait_ready(url, proc)
                asyncio.run(load(url, 1, 8, 4, vocab, "bench"))  # warm-up
                row = {"server": name, **asyncio.run(load(url, c, args.prompt_tokens, args.max_tokens, vocab,
                                                          "bench"))}
            finally:
                stop(proc)
            rows.append(row)
            print(f"{name:10s} c={c:3d}  {row['tok_s']:8.1f} tok/s  TTFT p50 {row['ttft_p50_ms']:8.1f} ms  "
                  f"p99 {row['ttft_p99_ms']:8.1f} ms  ({row['tokens']} tokens in {row['wall_s']:.1f} s)", flush=True)
    by = {(r["server"], r["concurrency"]): r for r in rows}
    for c in args.concurrency:
        if ("llama.cpp", c) in by:
            print(f"c={c}: herd / llama.cpp tokens/s = {by['herd', c]['tok_s'] / by['llama.cpp', c]['tok_s']:.2f}×")
    if ("herd", 1) in by:
        for c in args.concurrency:
            print(f"herd c={c}: {by['herd', c]['tok_s'] / by['herd', 1]['tok_s']:.2f}× its single-stream rate")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
