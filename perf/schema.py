"""The benchmark JSON schema (version 1) as data, and a validator for tests and `compare` (any process)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fornax.perf.common import SCHEMA_VERSION

_NUM = (int, float)

# Keys every record has, with their JSON types (None allowed where listed).
ENVELOPE: dict[str, tuple[type, ...]] = {
    "schema_version": (int,),
    "tool": (str,),
    "kind": (str,),
    "date": (str,),
    "commit": (str,),
    "commit_dirty": (bool, type(None)),
    "device": (dict,),
    "model": (str,),
    "config": (dict,),
    "startup": (dict,),
    "metrics": (dict,),
    "details": (dict,),
    "peer": (dict, type(None)),
    "ratios": (dict,),
}
DEVICE_KEYS: dict[str, tuple[type, ...]] = {
    "name": (str,), "cpu": (str,), "gpu": (list,), "num_cpus": (int,),
    "omp_num_threads": (str, type(None)), "torch_num_threads": (int, type(None)),
    "platform": (str,), "python": (str,), "torch": (str, type(None)),
}
_SERVE_STATS = [f"{stat}_{what}_ms" for what in ("ttft", "tpot", "itl", "e2el")
                for stat in ("mean", "median", "std", "p90", "p95", "p99")]
# Metrics each kind always reports (more may be present).
METRICS: dict[str, list[str]] = {
    "throughput": ["elapsed_s", "requests_per_s", "output_throughput", "total_token_throughput",
                   "num_input_tokens", "num_output_tokens", "num_cached_tokens", "num_steps",
                   "median_decode_step_ms"],
    "latency": ["mean_latency_s", "median_latency_s", "std_latency_s", "p90_latency_s",
                "p99_latency_s", "mean_ttft_ms", "mean_tpot_ms", "output_throughput"],
    "serve": ["completed", "failed", "duration_s", "total_input_tokens", "total_output_tokens",
              "request_throughput", "output_throughput", "total_token_throughput",
              *_SERVE_STATS],
    "embed": ["elapsed_s", "sentences_per_s", "tokens_per_s", "num_sentences", "num_tokens"],
    "structured": ["free_tpot_ms", "json_tpot_ms", "free_decode_step_ms", "json_decode_step_ms"],
    "asr": ["elapsed_s", "rtf", "audio_s_per_s", "wer", "num_files", "audio_seconds"],
    "realtime": ["final_latency_p50_ms", "final_latency_p90_ms", "first_delta_p50_ms",
                 "first_delta_p90_ms", "max_realtime_sessions", "wer", "num_utterances"],
    # per batch size B: step_ms_bB, floor_ms_bB, floor_fraction_bB (checked by the tests)
    "decode_floor": ["bandwidth_gb_s", "weight_gb_per_step", "kv_kib_per_token"],
    # per mode M: M_output_throughput, M_elapsed_s, M_median_decode_step_ms
    "modes": [],
    # per row count R: onednn_ms_mR, onednn_gflops_mR; with AMX also amx_ms_mR, amx_speedup_mR
    "cpu_linear": ["weight_gbytes"],
    # per case C (decode_bB, prefill_qN, chunk_qN_ctxM): torch_ref_ms_C, cpu_paged_ms_C, speedup_C
    "cpu_attention": [],
    "step_split": ["step_ms", "schedule_ms", "prepare_inputs_ms", "forward_ms", "compute_logits_ms",
                   "sampler_ms", "host_ms", "decode_tok_s"],
    # the engine's RSS in MiB (resident_memory.py); after_structured_* unless --no-structured
    "memory": ["file_mib", "kv_cache_mib", "bound_mib", "ready_rss_mib", "after_requests_rss_mib",
               "peak_rss_mib"],
}
STARTUP: dict[str, list[str]] = {
    "throughput": ["load_s", "warmup_s"],
    "latency": ["load_s", "warmup_s"],
    "serve": ["warmup_s"],
    "embed": ["load_s", "warmup_s"],
    "structured": ["load_s", "grammar_compile_s", "warmup_s"],
    "asr": ["load_s", "warmup_s"],
    "realtime": ["load_s", "warmup_s"],
    "decode_floor": ["load_s", "compile_capture_s"],
    "modes": [],
    "cpu_linear": ["pack_s"],
    "cpu_attention": [],
    "step_split": ["load_s"],
    "memory": ["start_s"],
}
PEER_KEYS: dict[str, tuple[type, ...]] = {"name": (str,), "metrics": (dict,), "startup": (dict,)}


def validate_record(record: Mapping[str, Any], *, check_metrics: bool = True) -> list[str]:
    """Every way `record` departs from the documented schema (empty list: it conforms).

    `check_metrics=False` checks only the envelope (what `compare` needs to read a file)."""
    errors: list[str] = []

    def check(where: str, obj: Mapping[str, Any], spec: Mapping[str, tuple[type, ...]]) -> None:
        for key, types in spec.items():
            if key not in obj:
                errors.append(f"{where}: missing {key!r}")
            elif not isinstance(obj[key], types) or (isinstance(obj[key], bool)
                                                     and bool not in types):
                errors.append(f"{where}.{key}: {type(obj[key]).__name__} is not "
                              + "/".join(t.__name__ for t in types))

    check("record", record, ENVELOPE)
    if errors:
        return errors
    if record["schema_version"] != SCHEMA_VERSION:
        errors.append(f"schema_version {record['schema_version']} != {SCHEMA_VERSION}")
    check("device", record["device"], DEVICE_KEYS)
    if not check_metrics:
        return errors
    kind = record["kind"]
    if kind not in METRICS:
        return errors + [f"unknown kind {kind!r}"]
    for name in METRICS[kind]:
        value = record["metrics"].get(name)
        if not isinstance(value, _NUM) or isinstance(value, bool):
            errors.append(f"metrics.{name}: missing or not a number")
    for name in STARTUP[kind]:
        if not isinstance(record["startup"].get(name), _NUM):
            errors.append(f"startup.{name}: missing or not a number")
    peer = record["peer"]
    if peer is not None:
        check("peer", peer, PEER_KEYS)
        for name, value in record["ratios"].items():
            if not isinstance(value, _NUM):
                errors.append(f"ratios.{name}: not a number")
    return errors
