"""`fornax bench memory` on a tiny model: a valid record whose phases read the engine's RSS, with
xgrammar loaded only after the structured-output request (no memory threshold here: the figures
against the bound are benchmark results in perf/results/resident_memory/)."""

from __future__ import annotations

import json

import pytest

from fornax.perf.cli import main
from fornax.perf.schema import validate_record
from helpers.api_server import tiny_model_path

pytestmark = pytest.mark.slow


def test_bench_memory_records_the_engine_rss_against_the_bound(tmp_path) -> None:
    out = tmp_path / "memory.json"
    code = main(["memory", "--model-path", str(tiny_model_path("llama")), "--kv-cache-memory",
                 "32MiB", "--serve-args", "--max-model-len 256", "--num-prompts", "2",
                 "--concurrency", "2", "--input-len", "8", "--output-len", "4",
                 "--output-json", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    assert validate_record(record) == []
    m, phases = record["metrics"], record["details"]["phases"]
    assert m["kv_cache_mib"] == 32
    assert m["bound_mib"] == pytest.approx(m["file_mib"] + 32 + 300e6 / 2**20)
    assert list(phases) == ["ready", "after_requests", "after_structured"]
    for snap in phases.values():  # an engine process's real RSS: the KV cache is part of it
        assert snap["rss_mib"] > 32 and snap["rss_anon_mib"] + snap["rss_file_mib"] <= (
            snap["rss_mib"] + 1)
    assert m["peak_rss_mib"] >= phases["ready"]["rss_mib"] * 0.9
    assert [s["xgrammar_loaded"] for s in phases.values()] == [False, False, True]
    assert m["structured_first_ttft_ms"] > 0 and m["structured_cached_ttft_ms"] > 0
