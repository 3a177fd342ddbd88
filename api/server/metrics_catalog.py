"""vLLM v1's Prometheus metric families and what fornax does with each: exported with vLLM's name,
labels and buckets, or absent and why (data for the tests and the README table; any process).

Sources: vllm/v1/metrics/loggers.py (PrometheusStatLogger, revisions 3168f587 and the one the
example dashboards of examples/observability/ read, see tests/fixtures/vllm_grafana_metrics.txt),
vllm/v1/spec_decode/metrics.py, the KV-connector, MFU and sleep-mode metric modules, and the
HTTP families vLLM's API server exports through prometheus-fastapi-instrumentator.
`python -m fornax.api.server.metrics_catalog` prints the README table.
"""

from __future__ import annotations

from dataclasses import dataclass

ML = ("model_name", "engine")  # vLLM's labels on every engine family

# why a family is absent, one constant per reason shared by its families
NO_SPEC_DECODE = "speculative decoding does not exist in fornax yet"
NO_KV_CACHE_METRICS = ("opt-in in vLLM (--kv-cache-metrics); block residency sampling is not "
                       "implemented")


@dataclass(frozen=True)
class Family:
    name: str  # as vLLM registers it (counters get _total in the exposition)
    kind: str  # counter, gauge, histogram
    labels: tuple[str, ...]
    buckets: str = ""  # the runtime/engine/stats.py bucket list a histogram uses
    absent: str = ""  # why fornax does not export it ("" = exported)


FAMILIES: tuple[Family, ...] = (
    Family("vllm:num_requests_running", "gauge", ML),
    Family("vllm:num_requests_waiting", "gauge", ML),
    Family("vllm:num_requests_waiting_by_reason", "gauge", (*ML, "reason")),
    Family("vllm:engine_sleep_state", "gauge", (*ML, "sleep_state")),
    Family("vllm:kv_cache_usage_perc", "gauge", ML),
    Family("vllm:prefix_cache_queries", "counter", ML),
    Family("vllm:prefix_cache_hits", "counter", ML),
    Family("vllm:external_prefix_cache_queries", "counter", ML),
    Family("vllm:external_prefix_cache_hits", "counter", ML),
    Family("vllm:mm_cache_queries", "counter", ML),
    Family("vllm:mm_cache_hits", "counter", ML),
    Family("vllm:num_preemptions", "counter", ML),
    Family("vllm:prompt_tokens", "counter", ML),
    Family("vllm:prompt_tokens_by_source", "counter", (*ML, "source")),
    Family("vllm:prompt_tokens_cached", "counter", ML),
    Family("vllm:prompt_tokens_cached_by_source", "counter", (*ML, "source")),
    Family("vllm:prompt_tokens_recomputed", "counter", ML),
    Family("vllm:generation_tokens", "counter", ML),
    Family("vllm:request_success", "counter", (*ML, "finished_reason")),
    Family("vllm:request_prompt_tokens", "histogram", ML, "1-2-5 to max_model_len"),
    Family("vllm:request_generation_tokens", "histogram", ML, "1-2-5 to max_model_len"),
    Family("vllm:iteration_tokens_total", "histogram", ML, "ITERATION_TOKENS_BUCKETS"),
    Family("vllm:request_max_num_generation_tokens", "histogram", ML, "1-2-5 to max_model_len"),
    Family("vllm:request_params_n", "histogram", ML, "PARAMS_N_BUCKETS"),
    Family("vllm:request_params_max_tokens", "histogram", ML, "1-2-5 to max_model_len"),
    Family("vllm:request_prefill_kv_computed_tokens", "histogram", ML, "1-2-5 to max_model_len"),
    Family("vllm:time_to_first_token_seconds", "histogram", ML, "TTFT_BUCKETS"),
    Family("vllm:inter_token_latency_seconds", "histogram", ML, "TOKEN_STEP_BUCKETS"),
    Family("vllm:request_time_per_output_token_seconds", "histogram", ML, "TOKEN_STEP_BUCKETS"),
    Family("vllm:e2e_request_latency_seconds", "histogram", ML, "REQUEST_LATENCY_BUCKETS"),
    Family("vllm:request_queue_time_seconds", "histogram", ML, "REQUEST_LATENCY_BUCKETS"),
    Family("vllm:request_inference_time_seconds", "histogram", ML, "REQUEST_LATENCY_BUCKETS"),
    Family("vllm:request_prefill_time_seconds", "histogram", ML, "REQUEST_LATENCY_BUCKETS"),
    Family("vllm:request_decode_time_seconds", "histogram", ML, "REQUEST_LATENCY_BUCKETS"),
    Family("vllm:cache_config_info", "gauge", ("block_size", "cache_dtype",
                                                "enable_prefix_caching", "gpu_memory_utilization",
                                                "num_gpu_blocks", "num_cpu_blocks",
                                                "prefix_caching_hash_algo", "kv_offloading_backend",
                                                "kv_offloading_size", "engine")),
    Family("vllm:sleep_mode_operation_duration_seconds", "histogram", ("operation",),
           "SLEEP_OPERATION_BUCKETS"),
    Family("vllm:sleep_mode_operations_in_flight", "gauge", ("operation",)),
    Family("vllm:websocket_connections_active", "gauge", ()),
    Family("vllm:websocket_connections_total", "counter", ()),
    Family("vllm:websocket_connection_duration_seconds", "histogram", ()),
    Family("http_requests_total", "counter", ("method", "status", "handler")),
    Family("http_request_duration_seconds", "histogram", ("method", "handler"),
           "HTTP_DURATION_BUCKETS"),
    # prometheus_client's process collector, as vLLM: only with one API server process
    Family("process_start_time_seconds", "gauge", ()),
    Family("process_cpu_seconds", "counter", ()),
    Family("process_resident_memory_bytes", "gauge", ()),
    Family("process_virtual_memory_bytes", "gauge", ()),
    Family("process_open_fds", "gauge", ()),
    Family("process_max_fds", "gauge", ()),
    # absent, with the reason
    Family("vllm:corrupted_requests", "counter", ML,
           absent="only with VLLM_COMPUTE_NANS_IN_LOGITS in vLLM; fornax does not scan logits "
           "for NaNs"),
    Family("vllm:lora_requests_info", "gauge", ("max_lora", "waiting_lora_adapters",
                                                "running_lora_adapters"),
           absent="LoRA adapters do not exist in fornax yet"),
    Family("vllm:spec_decode_num_drafts", "counter", ML,
           absent=NO_SPEC_DECODE),
    Family("vllm:spec_decode_num_draft_tokens", "counter", ML,
           absent=NO_SPEC_DECODE),
    Family("vllm:spec_decode_num_accepted_tokens", "counter", ML,
           absent=NO_SPEC_DECODE),
    Family("vllm:spec_decode_num_accepted_tokens_per_pos", "counter", (*ML, "position"),
           absent=NO_SPEC_DECODE),
    Family("vllm:kv_block_lifetime_seconds", "histogram", ML,
           absent=NO_KV_CACHE_METRICS),
    Family("vllm:kv_block_idle_before_evict_seconds", "histogram", ML,
           absent=NO_KV_CACHE_METRICS),
    Family("vllm:kv_block_reuse_gap_seconds", "histogram", ML,
           absent=NO_KV_CACHE_METRICS),
    Family("vllm:num_requests_kv_fetch_by_stage", "gauge", (*ML, "stage"),
           absent="KV connectors (--kv-transfer-config) do not exist in fornax"),
    Family("vllm:nixl_* (8 families)", "mixed", ML,
           absent="KV connectors (NixlConnector) do not exist in fornax"),
    Family("vllm:kv_offload_* / vllm:simple_kv_offload_* (16 families)", "mixed", ML,
           absent="KV offloading connectors do not exist in fornax"),
    Family("vllm:estimated_flops_per_gpu / _read_bytes_ / _write_bytes_per_gpu", "counter", ML,
           absent="vLLM's --enable-mfu-metrics FLOP model is not implemented"),
    Family("vllm:rl_weight_update_operation_duration_seconds", "histogram", ("operation",),
           absent="no RL weight-update API in fornax"),
)


def exported() -> list[Family]:
    return [f for f in FAMILIES if not f.absent]


def readme_table() -> str:
    """The README's metrics table: every family, exported or why not."""
    rows = ["| family | type | labels | fornax |", "|---|---|---|---|"]
    for f in FAMILIES:
        labels = ", ".join(f.labels) if f.labels else "-"
        rows.append(f"| `{f.name}` | {f.kind} | {labels} | {f.absent or 'yes'} |")
    return "\n".join(rows)


def cache_config_info(block_size: int, num_gpu_blocks: int, enable_prefix_caching: bool,
                      gpu_memory_utilization: float, cache_dtype: str) -> dict[str, str]:
    """vllm:cache_config_info's labels with fornax's values (vLLM's CacheConfig field names;
    what fornax does not have reads "None", as vLLM writes an unset field)."""
    return {
        "block_size": str(block_size), "cache_dtype": cache_dtype,
        "enable_prefix_caching": str(enable_prefix_caching),
        "gpu_memory_utilization": str(gpu_memory_utilization),
        "num_gpu_blocks": str(num_gpu_blocks), "num_cpu_blocks": "None",
        "prefix_caching_hash_algo": "sha256", "kv_offloading_backend": "None",
        "kv_offloading_size": "None"}


if __name__ == "__main__":
    import sys

    sys.stdout.write(readme_table() + "\n")
