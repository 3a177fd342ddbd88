"""vLLM's histogram bucket boundaries and the engine's per-step token histogram (engine-core
process counts, API workers expose; torch-free).

The boundaries are vLLM's (vllm/v1/metrics/loggers.py, the revision whose Grafana dashboards
`api/server/metrics_catalog.py` names), so PromQL written for vLLM (`le="1.0"` SLO panels,
`histogram_quantile`) reads fornax's histograms the same way.
"""

from __future__ import annotations

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
# inter-token latency and per-request time per output token
TOKEN_STEP_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                      7.5, 10.0, 20.0, 40.0, 80.0)
# e2e, queue, inference, prefill and decode time of a request
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
SLEEP_OPERATION_BUCKETS = (0.01, 0.1, 1, 10, 30, 60, 120, 300, 600)
HTTP_DURATION_BUCKETS = (0.1, 0.5, 1)  # http_request_duration_seconds (the instrumentator's)


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (token-count histograms, by max_model_len)."""
    out: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > max_value:
                return tuple(out)
            out.append(value)
        scale *= 10


class StepTokenHistogram:
    """Tokens scheduled per engine step, counted into ITERATION_TOKENS_BUCKETS (each step lands in
    the first bucket it fits; the last slot is +Inf). Plain ints: the input thread reads them
    while the busy loop adds (a snapshot may be one step behind, never torn in a way that
    matters for a counter)."""

    def __init__(self) -> None:
        self.counts = [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)
        self.total = 0

    def observe(self, num_tokens: int) -> None:
        index = len(ITERATION_TOKENS_BUCKETS)
        for i, bound in enumerate(ITERATION_TOKENS_BUCKETS):
            if num_tokens <= bound:
                index = i
                break
        self.counts[index] += 1
        self.total += num_tokens
