"""Prometheus metrics with vLLM's names: worker counters/histograms + engine gauges (API workers).

Workers write their counters and histograms in prometheus-client's multiprocess mode (files under
PROMETHEUS_MULTIPROC_DIR, set by `fornax serve` before any worker starts), so `/metrics` on any
worker shows the sum over all workers. Engine-wide numbers (running, waiting, KV usage, prefix
cache) are asked of the engine core at scrape time, so they are exact whichever worker answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from fornax.runtime import env
from fornax.runtime.engine.messages import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
_WS_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class Metrics:
    """The worker-side metrics of one served model."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()  # this worker's own (unused for output in mp mode)
        labels = ["model_name"]
        reg = self.registry
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                                     labels, registry=reg).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.", labels,
                                         registry=reg).labels(model_name)
        self._success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                ["model_name", "finished_reason"], registry=reg)
        self.ttft = Histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", labels,
                              buckets=_TTFT_BUCKETS, registry=reg).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", labels,
                             buckets=_ITL_BUCKETS, registry=reg).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", labels,
                             buckets=_E2E_BUCKETS, registry=reg).labels(model_name)

        # WS /v1/realtime connections (vLLM's names, no labels)
        self.ws_active = Gauge("vllm:websocket_connections_active",
                               "Number of currently active WebSocket connections.",
                               multiprocess_mode="livesum", registry=reg)
        self.ws_total = Counter("vllm:websocket_connections_total",
                                "Total number of WebSocket connections.", registry=reg)
        self.ws_duration = Histogram("vllm:websocket_connection_duration_seconds",
                                     "Duration of WebSocket connections in seconds.",
                                     buckets=_WS_BUCKETS, registry=reg)

    def request_finished(self, finished_reason: str) -> None:
        self._success.labels(self.model_name, finished_reason).inc()

    def render(self, engine: EngineStats | None) -> bytes:
        """The exposition text: all workers' metrics plus the engine's, if it answered."""
        registry = CollectorRegistry()
        path = env.PROMETHEUS_MULTIPROC_DIR.get()
        if path:
            MultiProcessCollector(registry, path)
        else:
            registry = self.registry
        if engine is not None:
            registry.register(_EngineCollector(self.model_name, engine))
        return generate_latest(registry)


class _EngineCollector:
    """Engine-wide gauges and counters from one EngineStats snapshot."""

    def __init__(self, model_name: str, stats: EngineStats) -> None:
        self.model_name = model_name
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        gauges: list[tuple[str, str, Any]] = [
            ("vllm:num_requests_running", "Number of requests in model execution batches.",
             s.num_running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
             s.num_waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_usage),
        ]
        for name, doc, value in gauges:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.model_name], float(value))
            yield g
        counters = [
            ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried "
             "tokens.", s.prefix_cache_queries),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
             s.prefix_cache_hits),
            ("vllm:num_preemptions", "Cumulative number of preemptions from the engine.",
             s.num_preemptions),
        ]
        for name, doc, value in counters:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric([self.model_name], float(value))
            yield c
