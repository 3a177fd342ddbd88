"""Prometheus metrics with vLLM's names, labels and buckets: per-request families recorded by the
API workers, engine-wide ones asked of the engine core at scrape time (API workers).

Workers write their counters and histograms in prometheus-client's multiprocess mode (files under
PROMETHEUS_MULTIPROC_DIR, set by `fornax serve` before any worker starts), so `/metrics` on any
worker shows the sum over all workers. Engine-wide numbers (running, waiting, KV usage, prefix
cache, preemptions, tokens per step, sleep state) come from one EngineStats snapshot
(api/server/metrics_engine.py), so they are exact whichever worker answers. Every family carries
vLLM's `model_name` and `engine` labels (fornax runs one engine core: engine="0").
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.process_collector import ProcessCollector

from fornax.api.server.metrics_engine import LABELS, EngineCollector, InfoCollector
from fornax.runtime import env
from fornax.runtime.engine.messages import EngineStats, RequestTimings
from fornax.runtime.engine.stats import (
    HTTP_DURATION_BUCKETS,
    PARAMS_N_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    SLEEP_OPERATION_BUCKETS,
    TOKEN_STEP_BUCKETS,
    TTFT_BUCKETS,
    build_1_2_5_buckets,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENGINE = "0"  # one engine core per server (vLLM numbers its data-parallel engines)
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")  # vLLM's FinishReason
PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
CACHED_SOURCES = ("device", "host", "disk", "p2p", "external_unspecified")
SLEEP_OPERATIONS = ("sleep", "release_kv_cache_memory", "wake")
# vLLM's instrumentator leaves these out of the http_* families
HTTP_EXCLUDED = frozenset({"/metrics", "/health", "/load", "/ping", "/version", "/server_info"})
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
REPETITION_STOP_REASON = "repetition_detected"  # the scheduler's stop_reason for that stop


class Metrics:
    """The worker-side metrics of one served model."""

    def __init__(self, model_name: str, max_model_len: int = 2048,
                 cache_info: dict[str, str] | None = None, api_server_count: int = 1) -> None:
        self.model_name = model_name
        self.cache_info = cache_info or {}
        self.api_server_count = api_server_count
        self.registry = reg = CollectorRegistry()  # this worker's own (unused for output in mp mode)
        lv = (model_name, ENGINE)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, LABELS, registry=reg).labels(*lv)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=reg).labels(*lv)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.")
        by_source = Counter("vllm:prompt_tokens_by_source", "Number of prompt tokens by source.",
                            LABELS + ["source"], registry=reg)
        self.prompt_by_source = {s: by_source.labels(*lv, s) for s in PROMPT_SOURCES}
        self.prompt_cached = counter("vllm:prompt_tokens_cached",
                                     "Number of cached prompt tokens (local + external).")
        self.prompt_recomputed = counter("vllm:prompt_tokens_recomputed",
                                         "Number of cached tokens recomputed for forward pass.")
        cached_by = Counter("vllm:prompt_tokens_cached_by_source",
                            "Number of cached prompt tokens by the tier that held them.",
                            LABELS + ["source"], registry=reg)
        self.cached_by_source = {s: cached_by.labels(*lv, s) for s in CACHED_SOURCES}
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          LABELS + ["finished_reason"], registry=reg)
        self._success = {r: success.labels(*lv, r) for r in FINISH_REASONS}
        # caches fornax does not have: vLLM exports them at 0 without a KV connector or an
        # encoder cache, so do we (dashboards divide hits by queries and show "no traffic")
        for name, doc in (
                ("vllm:external_prefix_cache_queries", "External prefix cache queries from KV "
                 "connector cross-instance cache sharing, in terms of number of queried tokens."),
                ("vllm:external_prefix_cache_hits", "External prefix cache hits from KV connector "
                 "cross-instance cache sharing, in terms of number of cached tokens."),
                ("vllm:mm_cache_queries",
                 "Multi-modal cache queries, in terms of number of queried items."),
                ("vllm:mm_cache_hits", "Multi-modal cache hits, in terms of number of cached "
                 "items.")):
            counter(name, doc)

        tokens = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens",
                                               "Number of prefill tokens processed.", tokens)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Number of generation tokens processed.", tokens)
        self.request_max_generation = histogram(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.", tokens)
        self.params_n = histogram("vllm:request_params_n",
                                  "Histogram of the n request parameter.", PARAMS_N_BUCKETS)
        self.params_max_tokens = histogram("vllm:request_params_max_tokens",
                                           "Histogram of the max_tokens request parameter.", tokens)
        self.prefill_kv_computed = histogram(
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).", tokens)
        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", TOKEN_STEP_BUCKETS)
        self.tpot = histogram("vllm:request_time_per_output_token_seconds",
                              "Histogram of time_per_output_token_seconds per request.",
                              TOKEN_STEP_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.",
                                    REQUEST_LATENCY_BUCKETS)
        self.inference_time = histogram("vllm:request_inference_time_seconds",
                                        "Histogram of time spent in RUNNING phase for request.",
                                        REQUEST_LATENCY_BUCKETS)
        self.prefill_time = histogram("vllm:request_prefill_time_seconds",
                                      "Histogram of time spent in PREFILL phase for request.",
                                      REQUEST_LATENCY_BUCKETS)
        self.decode_time = histogram("vllm:request_decode_time_seconds",
                                     "Histogram of time spent in DECODE phase for request.",
                                     REQUEST_LATENCY_BUCKETS)

        # sleep-mode operations (POST /sleep, /wake_up), timed where the API awaits them
        self._sleep_duration = Histogram("vllm:sleep_mode_operation_duration_seconds",
                                         "Duration of one sleep-mode operation.", ["operation"],
                                         buckets=SLEEP_OPERATION_BUCKETS, registry=reg)
        self._sleep_in_flight = Gauge("vllm:sleep_mode_operations_in_flight",
                                      "Sleep-mode operations currently awaited.", ["operation"],
                                      multiprocess_mode="livesum", registry=reg)
        for op in SLEEP_OPERATIONS:
            self._sleep_in_flight.labels(op).set(0)

        # HTTP requests, with prometheus-fastapi-instrumentator's names (vLLM serves them)
        self._http_total = Counter("http_requests_total", "Total number of requests by method, "
                                   "status and handler.", ["method", "status", "handler"],
                                   registry=reg)
        self._http_duration = Histogram("http_request_duration_seconds",
                                        "Latency with only few buckets by handler.",
                                        ["method", "handler"], buckets=HTTP_DURATION_BUCKETS,
                                        registry=reg)

        # WS /v1/realtime connections (vLLM's names, no labels)
        self.ws_active = Gauge("vllm:websocket_connections_active",
                               "Number of currently active WebSocket connections.",
                               multiprocess_mode="livesum", registry=reg)
        self.ws_total = Counter("vllm:websocket_connections_total",
                                "Total number of WebSocket connections.", registry=reg)
        self.ws_duration = Histogram("vllm:websocket_connection_duration_seconds",
                                     "Duration of WebSocket connections in seconds.",
                                     buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
                                     registry=reg)

    # ---- per-request events ----------------------------------------------------------------------
    def first_token(self, num_prompt: int, num_cached: int, ttft: float) -> None:
        """A request's first output: its prompt is done (computed or served from the cache)."""
        self.ttft.observe(ttft)
        self.prompt_tokens.inc(num_prompt)
        cached = min(max(num_cached, 0), num_prompt)
        self.prompt_by_source["local_compute"].inc(num_prompt - cached)
        self.prompt_by_source["local_cache_hit"].inc(cached)
        self.prompt_by_source["external_kv_transfer"].inc(0)
        self.prompt_cached.inc(cached)
        self.cached_by_source["device"].inc(cached)
        # fornax never counts the last prompt token as a cache hit: nothing cached is recomputed
        self.prompt_recomputed.inc(0)

    def request_finished(self, finished_reason: str) -> None:
        self._success[finished_reason if finished_reason in self._success else "stop"].inc()

    def finished(self, reason: str, *, e2e: float, num_prompt: int, num_generation: int,
                 num_cached: int, max_tokens: int | None,
                 timings: RequestTimings | None) -> None:
        """One engine request ended (a choice of an API request): vLLM's finished-request
        families. `timings` are the engine's phases (absent: the request never reached it)."""
        self.request_finished(reason)
        self.e2e.observe(e2e)
        self.request_prompt_tokens.observe(num_prompt)
        self.request_generation_tokens.observe(num_generation)
        self.prefill_kv_computed.observe(num_prompt - min(max(num_cached, 0), num_prompt))
        if max_tokens:
            self.params_max_tokens.observe(max_tokens)
        if timings is not None:
            self.queue_time.observe(timings.queued_s)
            self.prefill_time.observe(timings.prefill_s)
            self.inference_time.observe(timings.inference_s)
            self.decode_time.observe(timings.decode_s)
            self.tpot.observe(timings.decode_s / (num_generation - 1) if num_generation > 1
                              else 0.0)

    def parent_finished(self, n: int, max_generation_tokens: int) -> None:
        """An API prompt's n choices all ended: its n and the longest choice in tokens."""
        self.params_n.observe(n)
        self.request_max_generation.observe(max_generation_tokens)

    def observe_http(self, handler: str, method: str, status: int, seconds: float) -> None:
        if handler in HTTP_EXCLUDED:
            return
        if method not in HTTP_METHODS:  # any token reaches the app: no label per client whim
            method = "other"
        self._http_total.labels(method, f"{status // 100}xx", handler).inc()
        self._http_duration.labels(method, handler).observe(seconds)

    @contextmanager
    def sleep_operation(self, operation: str) -> Iterator[None]:
        """Time one sleep-mode operation the API awaits (sleep, wake)."""
        active = self._sleep_in_flight.labels(operation)
        start = time.perf_counter()
        active.inc()
        try:
            yield
        finally:
            active.dec()
            self._sleep_duration.labels(operation).observe(time.perf_counter() - start)

    # ---- exposition ------------------------------------------------------------------------------
    def _registry(self) -> CollectorRegistry:
        path = env.PROMETHEUS_MULTIPROC_DIR.get()
        if not path:
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path)
        if self.api_server_count == 1:  # one API process: its process_* numbers (as vLLM)
            ProcessCollector(registry=registry)
        return registry

    def render_models(self, engines: list[tuple[str, EngineStats, dict[str, str]]],
                      many: bool) -> bytes:
        """The exposition text of a server: (model name, engine stats, cache info) of each model
        whose engine answered. Many models: one family per name, a sample per model (its
        model_name label; vllm:cache_config_info gains one)."""
        if not many:
            return self.render(engines[0][1] if engines else None)
        registry = self._registry()
        registry.register(_Merged(
            [EngineCollector(name, ENGINE, stats) for name, stats, _ in engines]
            + [InfoCollector(ENGINE, {**info, "model_name": name})
               for name, _, info in engines if info]))
        return generate_latest(registry)

    def render(self, engine: EngineStats | None) -> bytes:
        """The exposition text: all workers' metrics plus the engine's, if it answered."""
        registry = self._registry()
        if engine is not None:
            registry.register(EngineCollector(self.model_name, ENGINE, engine))
        if self.cache_info:
            registry.register(InfoCollector(ENGINE, self.cache_info))
        return generate_latest(registry)


class _Merged:
    """Several collectors' families merged by name (a family appears once in the exposition)."""

    def __init__(self, collectors: list[Any]) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for collector in self.collectors:
            for family in collector.collect():
                held = families.get(family.name)
                if held is None:
                    families[family.name] = family
                else:
                    held.samples.extend(family.samples)
        yield from families.values()


def finish_label(finish_reason: str | None, stop_reason: int | str | None) -> str:
    """vLLM's finished_reason label of an engine request's end."""
    if stop_reason == REPETITION_STOP_REASON:
        return "repetition"
    return finish_reason or "stop"

