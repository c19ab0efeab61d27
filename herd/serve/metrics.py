"""Prometheus metrics for `GET /metrics` (text exposition format, prometheus-client).

Names follow vLLM's where one exists (time_to_first_token_seconds, inter_token_latency_seconds,
num_requests_running / waiting, generation_tokens_total), under the `herd_` prefix:

    herd_time_to_first_token_seconds   histogram  request arrival → first generated token
    herd_inter_token_latency_seconds   histogram  between consecutive tokens of one sequence
    herd_num_requests_running          gauge      sequences in the engine's batch (or prefilling)
    herd_num_requests_waiting          gauge      sequences queued for a row
    herd_generation_tokens_total       counter    generated tokens (tokens/s = rate() of it)
    herd_generation_tokens_per_second  gauge      the same rate over the last 10 s, for dashboards without PromQL
    herd_prompt_tokens_total           counter    prompt tokens accepted
    herd_request_success_total         counter    finished sequences, by finish_reason
    herd_guard_verdicts_total          counter    guard decisions, by guard and decision
    herd_prefix_cache_queries_total    counter    prompts looked up in the engine's prefix store
    herd_prefix_cache_hits_total       counter    of those, prompts that reused a cached prefix
    herd_prefix_cache_reused_tokens_total counter prompt tokens not prefilled thanks to it

Each app gets its own registry, so several servers (tests) in one process never share counters.
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)




class Metrics:
    def __init__(self, window_s: float = 10.0):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("herd_time_to_first_token_seconds", "Time from request arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("herd_inter_token_latency_seconds", "Time between consecutive tokens of a sequence",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("herd_num_requests_running", "Sequences decoding or prefilling", registry=r)
        self.waiting = Gauge("herd_num_requests_waiting", "Sequences waiting for a batch row", registry=r)
        self._tokens = Counter("herd_generation_tokens", "Generated tokens", registry=r)
        self.prompt_tokens = Counter("herd_prompt_tokens", "Prompt tokens accepted", registry=r)
        self.finished = Counter("herd_request_success", "Finished sequences by finish_reason",
                                ["finished_reason"], registry=r)
        self.guard_verdicts = Counter("herd_guard_verdicts", "Guard decisions", ["guard", "decision"], registry=r)
        self._window = window_s
        self._stamps: collections.deque = collections.deque()
        self._lock = threading.Lock()
        Gauge("herd_generation_tokens_per_second", "Generated tokens per second over the last window",
              registry=r).set_function(self.tokens_per_second)
        self.tokens = self  # `metrics.tokens.inc()` counts one generated token

    def inc(self, n: int = 1) -> None:
        self._tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            self._stamps.append((now, n))
            while self._stamps and self._stamps[0][0] < now - self._window:
                self._stamps.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._stamps and self._stamps[0][0] < now - self._window:
                self._stamps.popleft()
            return sum(n for _, n in self._stamps) / self._window

    def watch_prefix(self, store) -> None:
        """Export the engine's prefix store counters (herd.inference.cache.PrefixStore), read at scrape time."""
        self.registry.register(_PrefixCollector(store))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _PrefixCollector:
    """The prefix store's counters as Prometheus counters (the store counts; this only reads)."""

    def __init__(self, store):
        self.store = store

    def collect(self):
        for name, doc, value in (("queries", "Prompts looked up in the prefix store", self.store.queries),
                                 ("hits", "Prompts that reused a cached prefix", self.store.hits),
                                 ("reused_tokens", "Prompt tokens taken from the prefix store instead of prefilled",
                                  self.store.reused_tokens)):
            yield CounterMetricFamily(f"herd_prefix_cache_{name}", doc, value=value)
