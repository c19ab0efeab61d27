"""The one thread that owns the engine; HTTP handlers talk to it through queues.

    loop = EngineLoop(engine, metrics)            # engine: herd.Engine (add/cancel any thread, step one)
    loop.start()
    handle = loop.submit(prompt_ids, [params] * n, image_features=f)   # from an asyncio handler
    async for index, event in handle:             # herd.inference.engine.Event, per choice index
        ...
    handle.cancel()                               # client went away: the rows are freed next step
    result = await loop.call(fn)                  # run fn() in the engine thread between two steps

Layout (llama.cpp's tools/server/README-dev.md): one inference thread steps `herd.Engine` (continuous
batching: prefill one chunk of a waiting prompt, decode one token for every running row). HTTP
handlers do JSON, chat templates, tokenization and image decoding in the asyncio thread, then only
`add` and `cancel`. Each request has its own asyncio queue; after every step the thread hands each
request the list of its new events with one `call_soon_threadsafe`. A cancel is picked up at the
start of the next step, so a disconnected client's rows and cache are freed within one decode step.
Work that must touch the model outside `step` (image encoding, prompt log-probs) is queued with
`call` and runs in the same thread, so nothing races the engine.

The step thread never raises into the void: if `step` fails, every in-flight request receives an
error (streams send an error event and [DONE]) and the engine is rebuilt empty by `reset`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from typing import Any, Callable

from herd.serve.errors import InternalError, QueueFull

log = logging.getLogger("herd.serve")


class Handle:
    """One request's view of the engine: its sequences (one per choice) and an event queue."""

    def __init__(self, owner: "EngineLoop", rid: int, n: int, aloop: asyncio.AbstractEventLoop):
        self.owner, self.rid, self.n = owner, rid, n
        self.seq_ids = [(rid, i) for i in range(n)]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.aloop = aloop
        self.open = n  # choices not finished yet
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.owner.cancel(self)

    def __aiter__(self):
        return self._events()

    async def _events(self):
        """→ (choice index, Event) until every choice has finished; raises the loop's error if any."""
        while self.open > 0:
            batch = await self.queue.get()
            if isinstance(batch, BaseException):
                raise batch
            for index, ev in batch:
                if ev.finish_reason is not None:
                    self.open -= 1
                yield index, ev


class EngineLoop:
    """See the module docstring. max_queue: requests allowed to wait beyond the engine's rows."""

    def __init__(self, engine, metrics=None, *, max_queue: int = 256, idle_wait: float = 0.05):
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self.idle_wait = idle_wait
        self._routes: dict[Any, tuple[Handle, int]] = {}  # seq_id → (handle, choice index)
        self._first: dict[Any, float] = {}  # seq_id → time of its last token (for TTFT / ITL)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._rids = itertools.count()
        self.thread: threading.Thread | None = None
        self.in_flight = 0  # sequences submitted and not finished

    # ----- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> "EngineLoop":
        self.thread = threading.Thread(target=self._run, name="herd-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self.thread is not None:
            self.thread.join(timeout)

    # ----- called from HTTP handlers ----------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self.engine.active) + (1 if getattr(self.engine, "prefilling", None) is not None else 0)

    @property
    def waiting(self) -> int:
        return max(0, self.in_flight - self.running)

    def submit(self, prompt: list[int], params: list, *, image_features=None) -> Handle:
        """Queue one sequence per params entry (the request's choices). Raises QueueFull, or the
        engine's ValueError for a prompt it cannot take (the caller turns it into a 400)."""
        aloop = asyncio.get_running_loop()
        with self._lock:
            if self.in_flight + len(params) > self.engine.max_batch + self.max_queue:
                raise QueueFull(f"the server is at capacity ({self.engine.max_batch} running, {self.max_queue} "
                                "queued); retry later")
            handle = Handle(self, next(self._rids), len(params), aloop)
            for i, (sid, p) in enumerate(zip(handle.seq_ids, params)):
                self._routes[sid] = (handle, i)
            self.in_flight += len(params)
        added = []
        try:
            for sid, p in zip(handle.seq_ids, params):
                self.engine.add(prompt, p, image_features=image_features, seq_id=sid)
                added.append(sid)
        except BaseException:
            for sid in added:
                self.engine.cancel(sid)
            with self._lock:
                for sid in handle.seq_ids[len(added):]:
                    self._routes.pop(sid, None)
                    self.in_flight -= 1
            raise
        self._wake.set()
        return handle

    def cancel(self, handle: Handle) -> None:
        with self._lock:
            live = [sid for sid in handle.seq_ids if sid in self._routes]
        for sid in live:
            self.engine.cancel(sid)
        self._wake.set()

    def call(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Run fn() in the engine thread before its next step → an awaitable of its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, fut))
        self._wake.set()
        return asyncio.wrap_future(fut)

    # ----- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._run_jobs()
            if not self.engine.has_work():
                self._wake.wait(self.idle_wait)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a bug or an out-of-memory: fail the requests, keep serving
                log.exception("engine step failed")
                self._fail_all(InternalError(f"generation failed: {type(e).__name__}: {e}"))
                continue
            self._dispatch(events)

    def _run_jobs(self) -> None:
        while True:
            try:
                fn, fut = self._jobs.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

    def _dispatch(self, events) -> None:
        now = time.perf_counter()
        out: dict[Handle, list] = {}
        m = self.metrics
        with self._lock:
            for ev in events:
                route = self._routes.get(ev.seq_id)
                if route is None:
                    continue
                handle, index = route
                out.setdefault(handle, []).append((index, ev))
                if ev.token is not None and m is not None:
                    last = self._first.get(ev.seq_id)
                    if last is None:
                        m.ttft.observe(now - handle.submitted)
                    else:
                        m.itl.observe(now - last)
                    m.tokens.inc()
                    self._first[ev.seq_id] = now
                if ev.finish_reason is not None:
                    del self._routes[ev.seq_id]
                    self._first.pop(ev.seq_id, None)
                    self.in_flight -= 1
                    if m is not None:
                        m.finished.labels(ev.finish_reason).inc()
        for handle, batch in out.items():
            handle.aloop.call_soon_threadsafe(handle.queue.put_nowait, batch)
        if m is not None:
            m.running.set(self.running)
            m.waiting.set(self.waiting)

    def _fail_all(self, err: Exception) -> None:
        with self._lock:
            handles = {h for h, _ in self._routes.values()}
            sids = list(self._routes)
            self._routes.clear()
            self._first.clear()
            self.in_flight = 0
        for sid in sids:
            self.engine.cancel(sid)
        try:
            self.engine.step()  # drains the cancels: every row and queue entry is released
        except Exception:
            log.exception("engine could not release its rows after a failure")
        for h in handles:
            h.aloop.call_soon_threadsafe(h.queue.put_nowait, err)
