"""vLLM's engine-wide metric families, built at scrape time from one EngineStats snapshot and the
server's cache config (API workers).

The engine core is the one source of these numbers (running and waiting requests, KV usage,
prefix-cache counters, preemptions, tokens per step, sleep state): whichever API worker answers
/metrics asks the engine, so every worker shows the same exact values.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from fornax.runtime.engine.messages import EngineStats
from fornax.runtime.engine.stats import ITERATION_TOKENS_BUCKETS

LABELS = ["model_name", "engine"]
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")
WAITING_REASONS = ("capacity", "deferred")


class EngineCollector:
    """The engine's gauges, counters and per-step histogram for one scrape."""

    def __init__(self, model_name: str, engine: str, stats: EngineStats) -> None:
        self.values = [model_name, engine]
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s, lv = self.stats, self.values
        for name, doc, value in (
                ("vllm:num_requests_running", "Number of requests in model execution batches.",
                 s.num_running),
                ("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                 s.num_waiting),
                ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                 s.kv_usage)):
            g = GaugeMetricFamily(name, doc, labels=LABELS)
            g.add_metric(lv, float(value))
            yield g
        # every waiting request waits for capacity: fornax has no LoRA budget or KV transfer,
        # and requests held while their grammar compiles are not in the scheduler's queue yet
        g = GaugeMetricFamily(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for "
            "scheduling capacity; 'deferred' = deferred by transient constraints. Sum of all "
            "reasons equals vllm:num_requests_waiting.", labels=LABELS + ["reason"])
        g.add_metric(lv + ["capacity"], float(s.num_waiting))
        g.add_metric(lv + ["deferred"], 0.0)
        yield g
        g = GaugeMetricFamily(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is "
            "awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep "
            "level 2.", labels=LABELS + ["sleep_state"])
        level = s.sleep_level
        for state, on in zip(SLEEP_STATES, (level == 0, level == 1, level == 2), strict=True):
            g.add_metric(lv + [state], 1.0 if on else 0.0)
        yield g
        for name, doc, value in (
                ("vllm:prefix_cache_queries",
                 "Prefix cache queries, in terms of number of queried tokens.",
                 s.prefix_cache_queries),
                ("vllm:prefix_cache_hits",
                 "Prefix cache hits, in terms of number of cached tokens.", s.prefix_cache_hits),
                ("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                 s.num_preemptions)):
            c = CounterMetricFamily(name, doc, labels=LABELS)
            c.add_metric(lv, float(value))
            yield c
        yield self._iteration_tokens()

    def _iteration_tokens(self) -> Metric:
        s = self.stats
        counts = s.iteration_tokens_counts or [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip([*map(float, ITERATION_TOKENS_BUCKETS), float("inf")], counts,
                                strict=True):
            running += count
            buckets.append((_le(bound), float(running)))
        h = HistogramMetricFamily("vllm:iteration_tokens_total",
                                  "Histogram of number of tokens per engine_step.", labels=LABELS)
        h.add_metric(self.values, buckets, float(s.iteration_tokens_sum))
        return h


class InfoCollector:
    """vllm:cache_config_info: a gauge set to 1 whose labels are the cache configuration."""

    def __init__(self, engine: str, info: dict[str, str]) -> None:
        self.labels = dict(info, engine=engine)

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                              labels=list(self.labels))
        g.add_metric(list(self.labels.values()), 1.0)
        yield g


def _le(bound: float) -> str:
    """A bucket bound as prometheus_client writes it ("1.0", "+Inf")."""
    return floatToGoString(bound)
