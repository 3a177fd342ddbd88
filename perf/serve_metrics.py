"""`bench serve` metrics: request/s, tok/s, TTFT/TPOT/ITL/E2E stats and goodput vs SLOs (CLI process)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fornax.perf.common import summarize
from fornax.perf.serve_client import RequestResult

logger = logging.getLogger(__name__)

SLO_KEYS = ("ttft", "tpot", "e2el")
SERVE_PERCENTILES = (90, 95, 99)  # with the median: p50/p95/p99 as guidellm and vLLM report


def parse_goodput(specs: Sequence[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for spec in specs or []:
        for item in spec.replace(",", " ").split():
            key, sep, value = item.partition(":")
            if not sep or key not in SLO_KEYS:
                raise ValueError(f"bad --goodput item {item!r}: use KEY:MS with KEY in "
                                 f"{', '.join(SLO_KEYS)}")
            ms = float(value)
            if ms <= 0:
                raise ValueError(f"--goodput {key} must be positive, got {value}")
            slos[key] = ms
    return slos


def meets_slos(res: RequestResult, slos: dict[str, float]) -> bool:
    if not res.success:
        return False
    if "ttft" in slos and 1e3 * res.ttft > slos["ttft"]:
        return False
    tpot = res.tpot
    if "tpot" in slos and tpot is not None and 1e3 * tpot > slos["tpot"]:
        return False
    return not ("e2el" in slos and 1e3 * res.latency > slos["e2el"])


def compute_metrics(results: list[RequestResult], duration_s: float,
                    prompt_lens: Sequence[int], slos: dict[str, float]) -> dict[str, Any]:
    """The flat metrics dict of a serve run (vLLM's names; times in milliseconds).

    TTFT: send -> first text chunk. TPOT per request: (E2E - TTFT) / (output tokens - 1).
    ITL: every gap between consecutive text chunks, pooled over requests. E2E: send -> stream end.
    """
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else n
                       for r, n in zip(results, prompt_lens) if r.success)
    output_tokens = sum(r.output_tokens for r in ok)
    duration_s = max(duration_s, 1e-9)
    m: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
    }
    pcts = SERVE_PERCENTILES
    m.update(summarize([1e3 * r.ttft for r in ok], "ttft", "ms", pcts))
    m.update(summarize([1e3 * r.tpot for r in ok if r.tpot is not None], "tpot", "ms", pcts))
    m.update(summarize([1e3 * gap for r in ok for gap in r.itl], "itl", "ms", pcts))
    m.update(summarize([1e3 * r.latency for r in ok], "e2el", "ms", pcts))
    if slos:
        good = sum(1 for r in results if meets_slos(r, slos))
        m["request_goodput"] = good / duration_s
        m["good_requests"] = good
    return m


def length_mismatches(results: list[RequestResult]) -> int:
    """Requests whose output length differs from what was asked (EOS honoured, server cap...)."""
    return sum(1 for r in results if r.success and r.usage_reported
               and r.output_tokens != r.expected_output_len)
