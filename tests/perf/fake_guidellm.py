"""A stand-in for guidellm's `run --scenario FILE` (the guidellm_peer tests run it via --guidellm).

It appends the scenario to $FAKE_GUIDELLM_LOG, checks the target server answers /health, sends
one streamed request to the scenario's endpoint with the scenario's model, max_tokens and extra
body fields (as guidellm does), and writes a guidellm-shaped JSON (statistics derived from the
target's port, so two servers get different numbers) with per-request samples to the output path.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from typing import Any


def _dist(base: float) -> dict[str, Any]:
    pct = {"p001": base, "p01": base, "p05": base, "p10": base, "p25": base, "p50": base * 1.1,
           "p75": base * 1.2, "p90": base * 1.4, "p95": base * 1.5, "p99": base * 2,
           "p999": base * 2}
    return {"mean": base * 1.2, "median": base * 1.1, "percentiles": pct, "count": 3}


def _both(value: Any) -> dict[str, Any]:
    return {"successful": value, "errored": None, "incomplete": None, "total": value}


def main() -> int:
    if "--version" in sys.argv:
        print("guidellm version: 0.8.1")
        return 0
    scenario_path = sys.argv[sys.argv.index("--scenario") + 1]
    with open(scenario_path, encoding="utf-8") as fh:
        scenario = json.load(fh)
    log = os.environ.get("FAKE_GUIDELLM_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as out:
            out.write(json.dumps({"argv": sys.argv[1:], "scenario": scenario}) + "\n")
    spec = scenario["spec"]
    backend = spec["backend"]
    target = backend["target"]
    with urllib.request.urlopen(f"{target}/health", timeout=30) as resp:
        assert resp.status == 200
    body = {"model": backend["model"], "prompt": "hello there", "stream": True,
            "max_tokens": spec["data"][0]["output_tokens"], "ignore_eos": True,
            "stream_options": {"include_usage": True},
            **(backend.get("extras") or {}).get("body", {})}
    req = urllib.request.Request(target + backend["request_format"],
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        streamed = resp.read().decode()
    assert "data:" in streamed, streamed[:500]
    port = int(target.rsplit(":", 1)[1])
    base = 10.0 + port % 7
    metrics = {
        "request_totals": {"successful": 3, "errored": 0, "incomplete": 0, "total": 3},
        "output_tokens_per_second": _both({"mean": 1000.0 / base}),
        "tokens_per_second": _both({"mean": 5000.0 / base}),
        "requests_per_second": _both({"mean": 30.0 / base}),
        "time_to_first_token_ms": _both(_dist(base * 10)),
        "inter_token_latency_ms": _both(_dist(base)),
        "time_per_output_token_ms": _both(_dist(base + 1)),
        "request_latency": _both(_dist(base / 10)),
    }
    raw = {"metadata": {"version": "fake"}, "benchmarks": [
        {"duration": 1.5, "metrics": metrics, "requests": {"successful": [{"x": 1}] * 3}}]}
    with open(spec["outputs"][0]["path"], "w", encoding="utf-8") as out:
        json.dump(raw, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
