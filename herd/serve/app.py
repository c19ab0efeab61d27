"""`create_app(settings, engine)`: herd's OpenAI-compatible HTTP server (FastAPI).

    from herd.serve import Settings, create_app
    app = create_app(Settings(model_name="tiny", api_key="k"), herd.Engine(model, tokenizer=tok, max_seq_len=4096))
    uvicorn.run(app, port=8000)          # `herd serve MODEL` does this, loading the model in the background

Endpoints (schemas at /openapi.json):

    GET  /                      the chat UI (herd/serve/ui.html; --no-ui drops it)
    GET  /health                503 while the model loads, 200 {"status": "ok"} when ready (no key needed)
    GET  /metrics               Prometheus text (herd/serve/metrics.py; no key needed)
    GET  /v1/models             the served model with its context length
    POST /v1/chat/completions   text + images (data URLs), streaming (SSE), n, stop, seed, logprobs, tools
    POST /v1/completions        text or token-id prompts; echo + logprobs on prompt tokens (lm-eval)
    POST /v1/moderations        the guard pipeline's verdicts (with --guards)
    POST /tokenize, /detokenize

Layers: this module does HTTP, JSON, the chat format, tokenization and image decoding; the one
engine thread (herd/serve/worker.py) only generates. Requests and responses are the pydantic models
of herd/serve/protocol.py; every failure is an `APIError` rendered in one shape with the status from
one table (herd/serve/errors.py). Auth is a dependency of the API router, so no route can forget it.

Image handling: each image part is decoded and tiled once per request, and its vision features are
computed once (in the engine thread) and kept in a small LRU keyed by the tiles' bytes, so a
follow-up turn that sends the same image again does not re-encode it (llama.cpp#18686). The engine
has no cross-request prefix cache (yet): a follow-up turn prefills its whole history again.

Guards (--guards): the input check runs before generation (a blocked turn gets a refusal naming
the guard and categories, finish_reason "content_filter", and no tokens are generated); with an
output check, a streamed reply is held back until the guard has seen all of it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from herd.serve import tools as tooling
from herd.serve.errors import (APIError, BadRequest, ContextLengthExceeded, InternalError, ModelNotFound, NotReady,
                               PayloadTooLarge, Unauthorized, status_of, stream_error_events)
from herd.serve.guards import refusal_text
from herd.serve.metrics import Metrics
from herd.serve.protocol import (ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest,
                                 DetokenizeRequest, ErrorResponse, ModelList, ModerationRequest, TokenizeRequest)
from herd.serve.worker import EngineLoop

log = logging.getLogger("herd.serve")
UI_FILE = Path(__file__).with_name("ui.html")
ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 429, 503)}


@dataclass
class Settings:
    """What the server is configured with (`herd serve` fills it from its flags)."""

    model_name: str = "herd"  # the id /v1/models reports and requests may name
    api_key: str | None = None  # require `Authorization: Bearer KEY` on /v1/*, /tokenize, /detokenize
    max_model_len: int | None = None  # prompt + completion limit (default: the engine's max_seq_len)
    max_images: int = 8  # images per request (Llama 4 was tested with up to 5)
    max_image_bytes: int = 8 << 20  # per decoded image
    max_body_bytes: int = 64 << 20
    max_queue: int = 256  # sequences allowed to wait for a row; beyond: 429
    image_cache: int = 64  # images whose vision features are kept
    ui: bool = True
    guards: Any = None  # a GuardHook (herd/serve/guards.py) or None


# ----------------------------------------------------------------------------- the server's state
class Server:
    """Everything a request handler needs: settings, tokenizer, engine thread, metrics, guards."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.loop: EngineLoop | None = None
        self.engine = None
        self.created = int(time.time())
        self._features: collections.OrderedDict = collections.OrderedDict()
        self.image_encodes = 0  # images run through the vision encoder (the cache's misses)

    def attach(self, engine) -> None:
        """Start serving `engine` (a herd.Engine with a tokenizer); /health turns 200."""
        if engine.tokenizer is None:
            raise ValueError("the engine needs a tokenizer to serve text (herd.Engine(model, tokenizer=tok))")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.config = engine.model.config
        self.max_model_len = self.settings.max_model_len or engine.max_seq_len or \
            self.config.text.max_position_embeddings
        if engine.max_seq_len is not None and self.max_model_len > engine.max_seq_len:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the engine's max_seq_len {engine.max_seq_len}")
        self.stop_ids = sorted(set(self.config.text.eos_token_ids) | set(self.tokenizer.stop_tokens))
        if getattr(engine, "prefix", None) is not None:
            self.metrics.watch_prefix(engine.prefix)
        self.loop = EngineLoop(engine, self.metrics, max_queue=self.settings.max_queue).start()

    def close(self) -> None:
        if self.loop is not None:
            self.loop.stop()

    def ready(self) -> "Server":
        if self.loop is None:
            raise NotReady("the model is still loading")
        return self

    def check_model(self, name: str | None) -> None:
        if name and name != self.settings.model_name:
            raise ModelNotFound(f"the model {name!r} does not exist; this server serves {self.settings.model_name!r}",
                                param="model")

    # ----- images ------------------------------------------------------------------------------------
    async def image_features(self, tiles: list):
        """Vision features of every image (one tensor, in prompt order), encoded at most once per image."""
        if not tiles:
            return None
        import torch

        keys = [hashlib.sha256(t.numpy().tobytes()).hexdigest() + str(tuple(t.shape)) for t in tiles]
        model = self.engine.model

        def encode():
            out = []
            with torch.inference_mode():
                for k, t in zip(keys, tiles):
                    f = self._features.get(k)
                    if f is None:
                        f = model.encode_images(t.to(model.device))
                        self.image_encodes += 1
                        self._features[k] = f
                    self._features.move_to_end(k)
                    while len(self._features) > self.settings.image_cache:
                        self._features.popitem(last=False)
                    out.append(f)
            return torch.cat(out)

        return await self.loop.call(encode)

    # ----- prompt log-probs --------------------------------------------------------------------------
    async def prompt_logprobs(self, ids: list[int], top: int) -> list[tuple[float | None, list]]:
        """log P(ids[t] | ids[:t]) for every prompt token (None for the first) and the top-`top`
        alternatives, computed in the engine thread in chunks through a KV cache."""
        import torch

        from herd.inference.cache import KVCache

        model = self.engine.model

        def run():
            out: list[tuple[float | None, list]] = [(None, [])]
            cache = KVCache.for_model(model, 1, len(ids))
            prev = None
            with torch.inference_mode():
                for a in range(0, len(ids), 256):
                    x = torch.tensor([ids[a:a + 256]], device=model.device)
                    logits = model(x, cache=cache)[0].float()  # [t, vocab]
                    if prev is not None:
                        logits = torch.cat([prev[None], logits])
                        targets = ids[a:a + 256]
                    else:
                        logits, targets = logits, ids[1:a + 256]
                    prev = logits[-1]
                    logp = torch.log_softmax(logits[:len(targets)], -1)
                    chosen = logp.gather(1, torch.tensor(targets, device=logp.device)[:, None])[:, 0].tolist()
                    tv, ti = logp.topk(top, -1) if top else (None, None)
                    for j, lp in enumerate(chosen):
                        out.append((lp, list(zip(ti[j].tolist(), tv[j].tolist())) if top else []))
            return out

        return await self.loop.call(run)


# ----------------------------------------------------------------------------- helpers
def _now() -> int:
    return int(time.time())


def _token_str(tok, t: int) -> str:
    return tok.decode([t])


def _token_bytes(tok, t: int) -> list[int]:
    return list(tok.decode_bytes([t]))


def _check_image_url(url: str, limit: int) -> None:
    if not url.startswith("data:image/"):
        raise BadRequest("image_url must be a data URL (data:image/png;base64,...): this server fetches nothing "
                         "from the network or the disk", param="messages")
    head, sep, data = url.partition(",")
    if not sep or ";base64" not in head:
        raise BadRequest("an image data URL must be base64-encoded (data:image/...;base64,...)", param="messages")
    if len(data) * 3 // 4 > limit:
        raise PayloadTooLarge(f"an image is larger than the server's limit of {limit} bytes", param="messages")
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("an image data URL does not hold valid base64", param="messages") from None


def _messages_for_chat(req: ChatCompletionRequest, settings: Settings, system_extra: str | None) -> list[dict]:
    """Request messages → herd.chat messages (developer → system, tools prompt merged into the system turn)."""
    out: list[dict] = []
    n_images = 0
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        content = m.content
        if isinstance(content, list):
            parts = []
            for p in content:
                if p.type == "text":
                    parts.append({"type": "text", "text": p.text})
                else:
                    n_images += 1
                    if n_images > settings.max_images:
                        raise BadRequest(f"at most {settings.max_images} images per request", param="messages")
                    _check_image_url(p.image_url.url, settings.max_image_bytes)
                    parts.append({"type": "image_url", "image_url": {"url": p.image_url.url}})
            content = parts
        msg: dict = {"role": role, "content": content if content is not None else ""}
        if m.tool_calls and role == "assistant":
            msg["tool_calls"] = [{"function": {"name": c.function.name, "arguments": c.function.arguments}}
                                 for c in m.tool_calls]
        out.append(msg)
    if system_extra:
        if out and out[0]["role"] == "system" and isinstance(out[0]["content"], str):
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + system_extra}
        else:
            out.insert(0, {"role": "system", "content": system_extra})
    return out


def _plain_messages(messages: list[dict]) -> list[dict]:
    """Messages with images replaced by a marker: what guards and logs see."""
    out = []
    for m in messages:
        c = m["content"]
        if isinstance(c, list):
            c = " ".join(p["text"] if p["type"] == "text" else "[image]" for p in c)
        out.append({"role": m["role"], "content": c})
    return out


def _max_new(prompt_len: int, requested: int | None, limit: int) -> int:
    if prompt_len >= limit:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limit} tokens. However, your prompt has {prompt_len} tokens, "
            "which leaves no room for a completion. Please shorten the prompt.", param="messages")
    if requested is None:
        return limit - prompt_len
    if prompt_len + requested > limit:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limit} tokens. However, you requested {prompt_len + requested} "
            f"tokens ({prompt_len} in the prompt, {requested} in the completion). Please reduce the prompt or the "
            "completion length.", param="max_tokens")
    return requested


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Choice:
    """What one choice has generated so far."""

    def __init__(self, index: int):
        self.index = index
        self.tokens: list[int] = []
        self.text = ""
        self.logprobs: list = []  # (token, logprob, top) of generated tokens
        self.finish_reason: str | None = None
        self.cached_tokens = 0  # prompt tokens the engine's prefix store supplied


def _chat_logprob(tok, t: int, lp: float, top) -> dict:
    return {"token": _token_str(tok, t), "logprob": lp, "bytes": _token_bytes(tok, t),
            "top_logprobs": [{"token": _token_str(tok, i), "logprob": v, "bytes": _token_bytes(tok, i)}
                             for i, v in (top or [])]}


def _finish(reason: str | None) -> str:
    return {"cancelled": "abort"}.get(reason, reason or "stop")


class BodyLimit:
    """413 for a body over `limit` bytes: by its Content-Length before reading, or while a chunked body
    arrives. A plain ASGI middleware (Starlette's BaseHTTPMiddleware would hide client disconnects
    from the handlers, and a disconnect must cancel the request's sequences)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        err = PayloadTooLarge(f"the request body is larger than {self.limit} bytes")
        size = dict(scope["headers"]).get(b"content-length", b"")
        if size.isdigit() and int(size) > self.limit:
            return await JSONResponse(err.body(), status_code=413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise err
            return message

        await self.app(scope, counted, send)


# ----------------------------------------------------------------------------- the app
def create_app(settings: Settings | None = None, engine=None) -> FastAPI:
    """The FastAPI app. engine None: the server answers 503 until `app.state.server.attach(engine)`."""
    settings = settings or Settings()
    server = Server(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.close()  # stop the engine thread with the HTTP server

    app = FastAPI(title="herd", version="0.1.0", summary="OpenAI-compatible Llama 4 server (herd)", lifespan=lifespan)
    app.state.server = server
    if engine is not None:
        server.attach(engine)

    # ----- errors: one shape, one table --------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=status_of(err))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = first.get("msg", "invalid request")
        return await _api_error(request, BadRequest(f"{'.'.join(loc) or 'body'}: {msg}",
                                                    param=".".join(loc) or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        body = {"error": {"message": str(err.detail), "type": kind, "param": None, "code": None}}
        return JSONResponse(body, status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception):
        log.exception("unhandled error")
        return await _api_error(request, InternalError(f"internal error: {type(err).__name__}"))

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    # ----- auth: a dependency of the API router ------------------------------------------------------
    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
            raise Unauthorized("missing or invalid API key: send `Authorization: Bearer KEY`")

    api = APIRouter(dependencies=[Depends(check_key)], responses=ERRORS)

    # ----- public routes ------------------------------------------------------------------------------
    @app.get("/health", responses={503: {"model": ErrorResponse}})
    def health():
        server.ready()
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response)
    def metrics():
        body, ctype = server.metrics.render()
        return Response(body, media_type=ctype)

    if settings.ui:
        @app.get("/", response_class=HTMLResponse, include_in_schema=False)
        def ui():
            return HTMLResponse(UI_FILE.read_text(encoding="utf-8"))

    # ----- /v1/models ---------------------------------------------------------------------------------
    @api.get("/v1/models", response_model=ModelList)
    def models():
        s = server.ready()
        card = {"id": settings.model_name, "object": "model", "created": s.created, "owned_by": "herd",
                "max_model_len": s.max_model_len, "context_length": s.max_model_len}
        return {"object": "list", "data": [card]}

    # ----- tokenize / detokenize ----------------------------------------------------------------------
    @api.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        s = server.ready()
        s.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise BadRequest("give exactly one of `prompt` or `messages`", param="prompt")
        if req.prompt is not None:
            try:
                ids = s.tokenizer.encode(req.prompt, bos=req.add_special_tokens)
            except ValueError as e:
                raise BadRequest(f"cannot encode the prompt: {e}", param="prompt") from None
        else:
            fake = ChatCompletionRequest(messages=req.messages)
            ids, _ = await _encode_chat(s, fake, None, add_generation_prompt=req.add_generation_prompt)
        return {"count": len(ids), "max_model_len": s.max_model_len, "tokens": ids}

    @api.post("/detokenize")
    def detokenize(req: DetokenizeRequest):
        s = server.ready()
        s.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < s.config.text.vocab_size]
        if bad:
            raise BadRequest(f"token {bad[0]} is outside the vocabulary [0, {s.config.text.vocab_size})",
                             param="tokens")
        try:
            return {"prompt": s.tokenizer.decode(req.tokens)}
        except (ValueError, KeyError, OverflowError) as e:
            raise BadRequest(f"cannot decode these tokens: {e}", param="tokens") from None

    # ----- moderations --------------------------------------------------------------------------------
    @api.post("/v1/moderations")
    async def moderations(req: ModerationRequest):
        if settings.guards is None:
            raise ModelNotFound("no moderation model: start the server with --guards CONFIG", param="model")
        inputs = [req.input] if isinstance(req.input, str) else list(req.input)
        body = await run_in_threadpool(settings.guards.moderate, inputs)
        for r in body.get("results", []):
            server.metrics.guard_verdicts.labels("moderation", "block" if r.get("flagged") else "allow").inc()
        return body

    # ----- chat completions ---------------------------------------------------------------------------
    @api.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        s = server.ready()
        s.check_model(req.model)
        unknown = req.unknown_fields()
        if unknown:
            log.info("ignoring unknown request fields: %s", ", ".join(unknown))
        if req.logit_bias:
            raise BadRequest("logit_bias is not supported", param="logit_bias")
        if req.response_format is not None and req.response_format.type != "text":
            raise BadRequest("response_format json_object / json_schema needs constrained decoding, which herd "
                             "does not have yet", param="response_format")
        mode, shown, named = tooling.tool_mode(req)
        system_extra = tooling.system_prompt(shown, mode) if shown else None
        ids, tiles = await _encode_chat(s, req, system_extra)
        prefix_text = tooling.forced_prefix(mode, named)
        prefix = s.tokenizer.encode(prefix_text) if prefix_text else []
        ids = ids + prefix
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_new = _max_new(len(ids), requested, s.max_model_len)
        want_lp = (req.top_logprobs or 0) if req.logprobs else None
        n = req.n or 1
        params = [req.sampling_params(max_new_tokens=max_new, eos_ids=s.stop_ids, seed_offset=i, logprobs=want_lp)
                  for i in range(n)]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", _now()
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        plain = _plain_messages(_messages_for_chat(req, settings, None))

        verdict = None
        if settings.guards is not None:
            verdict = await run_in_threadpool(settings.guards.check_input, plain)
            s.metrics.guard_verdicts.labels(verdict.guard, verdict.decision).inc()
        if verdict is not None and verdict.decision == "block":
            return _refusal(req, rid, created, verdict, len(ids), n, include_usage)

        feats = await s.image_features(tiles)
        try:
            handle = s.loop.submit(ids, params, image_features=feats)
        except ValueError as e:
            raise BadRequest(str(e), param="messages") from None
        s.metrics.prompt_tokens.inc(len(ids) * n)
        ctx = _ChatCtx(s, req, rid, created, mode, prefix, prefix_text, plain, len(ids), n, include_usage, want_lp)
        if req.stream:
            return StreamingResponse(_chat_stream(ctx, handle), media_type="text/event-stream")
        return await _chat_full(ctx, handle, request)

    def _refusal(req, rid, created, verdict, prompt_len, n, include_usage):
        text = refusal_text(verdict)
        guard = verdict.to_dict()
        if not req.stream:
            choices = [{"index": i, "message": {"role": "assistant", "content": text, "refusal": text},
                        "logprobs": None, "finish_reason": "content_filter"} for i in range(n)]
            return {"id": rid, "object": "chat.completion", "created": created, "model": settings.model_name,
                    "choices": choices, "usage": _usage_counts(prompt_len, 0), "guard": guard}

        def events():
            base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": settings.model_name}
            for i in range(n):
                yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": text},
                                                 "logprobs": None, "finish_reason": "content_filter"}],
                            "guard": guard})
            if include_usage:
                yield _sse({**base, "choices": [], "usage": _usage_counts(prompt_len, 0)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # ----- completions --------------------------------------------------------------------------------
    @api.post("/v1/completions", response_model=Completion, responses={200: {"content": {"text/event-stream": {}}}})
    async def completions(req: CompletionRequest, request: Request):
        s = server.ready()
        s.check_model(req.model)
        if req.unknown_fields():
            log.info("ignoring unknown request fields: %s", ", ".join(req.unknown_fields()))
        if req.logit_bias:
            raise BadRequest("logit_bias is not supported", param="logit_bias")
        if req.suffix:
            raise BadRequest("suffix (fill-in-the-middle) is not supported", param="suffix")
        prompts = _completion_prompts(s, req)
        n = req.n or 1
        rid, created = f"cmpl-{uuid.uuid4().hex}", _now()
        jobs = []
        for p_idx, ids in enumerate(prompts):
            max_new = _max_new(len(ids), req.max_tokens, s.max_model_len)
            params = [req.sampling_params(max_new_tokens=max_new, eos_ids=s.stop_ids, seed_offset=i,
                                          logprobs=req.logprobs) for i in range(n)]
            jobs.append((p_idx, ids, params))
        echo_lp = {}
        if req.echo and req.logprobs is not None:
            for p_idx, ids, _ in jobs:
                echo_lp[p_idx] = await s.prompt_logprobs(ids, req.logprobs)
        handles = []
        try:
            for p_idx, ids, params in jobs:
                if params[0].max_new_tokens == 0:
                    handles.append(None)
                    continue
                handles.append(s.loop.submit(ids, params))
                s.metrics.prompt_tokens.inc(len(ids) * n)
        except ValueError as e:
            for h in handles:
                if h is not None:
                    h.cancel()
            raise BadRequest(str(e), param="prompt") from None
        ctx = _CmplCtx(s, req, rid, created, jobs, handles, echo_lp, n)
        if req.stream:
            return StreamingResponse(_completion_stream(ctx), media_type="text/event-stream")
        return await _completion_full(ctx, request)

    app.include_router(api)
    return app


# ----------------------------------------------------------------------------- chat internals
async def _encode_chat(s: Server, req: ChatCompletionRequest, system_extra, add_generation_prompt: bool = True):
    from herd.chat import encode_messages

    msgs = _messages_for_chat(req, s.settings, system_extra)
    has_images = any(isinstance(m["content"], list) and any(p["type"] == "image_url" for p in m["content"])
                     for m in msgs)
    if has_images and s.config.vision is None:
        raise BadRequest("this model is text-only: it cannot take images", param="messages")

    def encode():
        return encode_messages(s.tokenizer, msgs, add_generation_prompt, s.config.vision,
                               tool_prompt_format="python_list")

    try:
        return await run_in_threadpool(encode)
    except PayloadTooLarge:
        raise
    except (ValueError, OSError, SyntaxError) as e:  # PIL raises OSError / SyntaxError on broken images
        raise BadRequest(f"cannot read the messages: {e}", param="messages") from None


@dataclass
class _ChatCtx:
    s: Server
    req: ChatCompletionRequest
    rid: str
    created: int
    mode: str
    prefix: list
    prefix_text: str
    plain: list
    prompt_len: int
    n: int
    include_usage: bool
    want_lp: int | None


def _tool_calls(ctx: _ChatCtx, ch: _Choice) -> list[dict]:
    if ctx.mode == "none":
        return []
    calls = tooling.parse_calls(ctx.s.tokenizer, ctx.prefix + ch.tokens)
    if not ctx.req.parallel_tool_calls:
        calls = calls[:1]
    return calls


def _has_output_guard(s: Server) -> bool:
    return callable(getattr(s.settings.guards, "check_output", None))


def _output_verdict(ctx: _ChatCtx, text: str):
    g = ctx.s.settings.guards
    if not _has_output_guard(ctx.s) or not text:
        return None
    v = g.check_output(ctx.plain, text)
    ctx.s.metrics.guard_verdicts.labels(v.guard, v.decision).inc()
    return v if v.decision == "block" else None


def _usage_counts(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's `usage` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _usage(prompt_len: int, choices) -> dict:
    """Usage of a chat completion; prompt_tokens_details.cached_tokens (OpenAI's field): the prompt
    tokens not prefilled again because the engine kept them from an earlier request (the first choice's)."""
    usage = _usage_counts(prompt_len, sum(len(c.tokens) for c in choices))
    usage["prompt_tokens_details"] = {"cached_tokens": choices[0].cached_tokens if choices else 0}
    return usage


async def _collect(handle, choices, request: Request | None):
    """Events → choices until every choice finished; cancels when the client disconnects."""
    it = handle.__aiter__()
    checked = time.monotonic()
    while True:
        nxt = asyncio.ensure_future(it.__anext__())
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=0.25)
            if request is not None and (not done or time.monotonic() - checked > 0.25):
                checked = time.monotonic()
                if await request.is_disconnected():  # checked while tokens flow too
                    nxt.cancel()
                    handle.cancel()
                    return False
            if done:
                break
        try:
            index, ev = nxt.result()
        except StopAsyncIteration:
            return True
        ch = choices[index]
        ch.cached_tokens = max(ch.cached_tokens, ev.cached_tokens)
        if ev.token is not None:
            ch.tokens.append(ev.token)
            if ev.logprob is not None:
                ch.logprobs.append((ev.token, ev.logprob, ev.top_logprobs))
        ch.text += ev.text
        if ev.finish_reason is not None:
            ch.finish_reason = ev.finish_reason


async def _chat_full(ctx: _ChatCtx, handle, request: Request) -> dict:
    s, tok = ctx.s, ctx.s.tokenizer
    choices = [_Choice(i) for i in range(ctx.n)]
    if not await _collect(handle, choices, request):
        return Response(status_code=499)  # the client went away; its sequences were cancelled
    out, guard = [], None
    for ch in choices:
        calls = _tool_calls(ctx, ch)
        msg: dict = {"role": "assistant", "content": None if calls else ctx.prefix_text + ch.text}
        finish = _finish(ch.finish_reason)
        if calls:
            msg["tool_calls"] = calls
            finish = "tool_calls"
        else:
            v = await run_in_threadpool(_output_verdict, ctx, msg["content"])
            if v is not None:
                msg["content"] = refusal_text(v)
                msg["refusal"] = msg["content"]
                finish, guard = "content_filter", v.to_dict()
        lps = None
        if ctx.want_lp is not None:
            lps = {"content": [_chat_logprob(tok, t, lp, top) for t, lp, top in ch.logprobs
                               if t not in s.stop_ids]}
        out.append({"index": ch.index, "message": msg, "logprobs": lps, "finish_reason": finish})
    body = {"id": ctx.rid, "object": "chat.completion", "created": ctx.created, "model": s.settings.model_name,
            "choices": out, "usage": _usage(ctx.prompt_len, choices), "system_fingerprint": None}
    if guard is not None:
        body["guard"] = guard
    return body


async def _chat_stream(ctx: _ChatCtx, handle):
    """SSE: a role chunk per choice, content (or held-back tool calls) deltas, a finish chunk per choice,
    then (stream_options.include_usage) one usage chunk with empty choices, then [DONE]."""
    s, tok = ctx.s, ctx.s.tokenizer
    base = {"id": ctx.rid, "object": "chat.completion.chunk", "created": ctx.created, "model": s.settings.model_name,
            "system_fingerprint": None}
    extra = {"usage": None} if ctx.include_usage else {}
    choices = [_Choice(i) for i in range(ctx.n)]
    holding = [ctx.mode != "none" for _ in choices]  # tool mode: hold text while it may be a call
    pending = [ctx.prefix_text for _ in choices]
    guarded = _has_output_guard(s)  # an output guard sees the whole reply before any of it is shown
    finished = False

    def chunk(index, delta, finish=None, lps=None):
        return _sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": lps, "finish_reason": finish}],
                     **extra})

    try:
        for ch in choices:
            yield chunk(ch.index, {"role": "assistant", "content": ""})
        async for index, ev in handle:
            ch = choices[index]
            ch.cached_tokens = max(ch.cached_tokens, ev.cached_tokens)
            if ev.token is not None:
                ch.tokens.append(ev.token)
            ch.text += ev.text
            lps = None
            if ev.logprob is not None and ev.token not in s.stop_ids:
                lps = {"content": [_chat_logprob(tok, ev.token, ev.logprob, ev.top_logprobs)]}
            if holding[index] or guarded:
                pending[index] += ev.text
                if holding[index] and not tooling.looks_like_call(pending[index]) and not guarded:
                    holding[index] = False
                    yield chunk(index, {"content": pending[index]}, lps=lps)
                    pending[index] = ""
            elif ev.text or lps:
                yield chunk(index, {"content": ev.text}, lps=lps)
            if ev.finish_reason is None:
                continue
            ch.finish_reason = ev.finish_reason
            finish = _finish(ev.finish_reason)
            calls = _tool_calls(ctx, ch) if holding[index] else []
            if calls:
                for k, c in enumerate(calls):
                    yield chunk(index, {"tool_calls": [{"index": k, **c}]})
                finish = "tool_calls"
            elif holding[index] or guarded:
                v = await run_in_threadpool(_output_verdict, ctx, pending[index]) if guarded else None
                if v is not None:
                    text = refusal_text(v)
                    yield _sse({**base, "choices": [{"index": index, "delta": {"content": text, "refusal": text},
                                                     "logprobs": None, "finish_reason": None}],
                                "guard": v.to_dict(), **extra})
                    finish = "content_filter"
                elif pending[index]:
                    yield chunk(index, {"content": pending[index]})
            yield chunk(index, {}, finish)
        finished = True
        if ctx.include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(ctx.prompt_len, choices)})
        yield "data: [DONE]\n\n"
    except APIError as e:
        finished = True
        for line in stream_error_events(e):
            yield line
    finally:
        if not finished:  # the client went away (or the server is shutting down): free the rows
            handle.cancel()


# ----------------------------------------------------------------------------- completion internals
def _completion_prompts(s: Server, req: CompletionRequest) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        texts, id_lists = [p], None
    elif p and all(isinstance(x, int) for x in p):
        texts, id_lists = None, [list(p)]
    elif p and all(isinstance(x, list) for x in p):
        texts, id_lists = None, [list(x) for x in p]
    elif p and all(isinstance(x, str) for x in p):
        texts, id_lists = list(p), None
    else:
        raise BadRequest("prompt must be a string, a list of strings, a list of token ids or a list of such lists, "
                         "and not empty", param="prompt")
    if texts is not None:
        try:
            id_lists = [s.tokenizer.encode(t, bos=True) for t in texts]
        except ValueError as e:
            raise BadRequest(f"cannot encode the prompt: {e}", param="prompt") from None
    if len(id_lists) > 64:
        raise BadRequest("at most 64 prompts per request", param="prompt")
    V = s.config.text.vocab_size
    for ids in id_lists:
        if not ids:
            raise BadRequest("a prompt is empty", param="prompt")
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise BadRequest(f"prompt token {bad[0]} is outside the vocabulary [0, {V})", param="prompt")
    return id_lists


@dataclass
class _CmplCtx:
    s: Server
    req: CompletionRequest
    rid: str
    created: int
    jobs: list
    handles: list
    echo_lp: dict
    n: int


def _cmpl_logprobs(tok, entries, offset0: int) -> dict:
    """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    off = offset0
    for t, lp, top in entries:
        s = _token_str(tok, t)
        out["tokens"].append(s)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(None if lp is None else {_token_str(tok, i): v for i, v in (top or [])})
        out["text_offset"].append(off)
        off += len(s)
    return out


def _echo_entries(ctx: _CmplCtx, p_idx: int, ids: list[int]) -> list:
    lp = ctx.echo_lp.get(p_idx)
    if lp is None:
        return [(t, None, None) for t in ids]
    return [(t, v, top) for t, (v, top) in zip(ids, lp)]


async def _completion_full(ctx: _CmplCtx, request: Request):
    s, tok, req = ctx.s, ctx.s.tokenizer, ctx.req
    out, prompt_tokens, completion_tokens = [], 0, 0
    for (p_idx, ids, params), handle in zip(ctx.jobs, ctx.handles):
        choices = [_Choice(i) for i in range(ctx.n)]
        if handle is not None:
            if not await _collect(handle, choices, request):
                for h in ctx.handles:
                    if h is not None:
                        h.cancel()
                return Response(status_code=499)
        else:
            for ch in choices:
                ch.finish_reason = "length"
        prompt_tokens += len(ids) * ctx.n
        echo_text = tok.decode(ids) if req.echo else ""
        for ch in choices:
            completion_tokens += len(ch.tokens)
            lps = None
            if req.logprobs is not None:
                entries = (_echo_entries(ctx, p_idx, ids) if req.echo else []) + \
                          [(t, lp, top) for t, lp, top in ch.logprobs if t not in s.stop_ids]
                lps = _cmpl_logprobs(tok, entries, 0)
            out.append({"index": p_idx * ctx.n + ch.index, "text": echo_text + ch.text, "logprobs": lps,
                        "finish_reason": _finish(ch.finish_reason)})
    return {"id": ctx.rid, "object": "text_completion", "created": ctx.created, "model": s.settings.model_name,
            "choices": out, "usage": _usage_counts(prompt_tokens, completion_tokens)}


async def _completion_stream(ctx: _CmplCtx):
    s, tok, req = ctx.s, ctx.s.tokenizer, ctx.req
    base = {"id": ctx.rid, "object": "text_completion", "created": ctx.created, "model": s.settings.model_name}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    prompt_tokens = completion_tokens = 0
    finished = False

    def chunk(index, text, finish=None, lps=None):
        return _sse({**base, "choices": [{"index": index, "text": text, "logprobs": lps, "finish_reason": finish}]})

    try:
        for (p_idx, ids, params), handle in zip(ctx.jobs, ctx.handles):
            prompt_tokens += len(ids) * ctx.n
            for i in range(ctx.n):
                if req.echo:
                    lps = _cmpl_logprobs(tok, _echo_entries(ctx, p_idx, ids), 0) if req.logprobs is not None else None
                    yield chunk(p_idx * ctx.n + i, tok.decode(ids), lps=lps)
                if handle is None:
                    yield chunk(p_idx * ctx.n + i, "", "length")
            if handle is None:
                continue
            async for index, ev in handle:
                if ev.token is not None:
                    completion_tokens += 1
                lps = None
                if ev.logprob is not None and ev.token not in s.stop_ids:
                    lps = _cmpl_logprobs(tok, [(ev.token, ev.logprob, ev.top_logprobs)], 0)
                if ev.text or lps or ev.finish_reason:
                    yield chunk(p_idx * ctx.n + index, ev.text,
                                _finish(ev.finish_reason) if ev.finish_reason else None, lps)
        finished = True
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage_counts(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"
    except APIError as e:
        finished = True
        for line in stream_error_events(e):
            yield line
    finally:
        if not finished:
            for h in ctx.handles:
                if h is not None:
                    h.cancel()
