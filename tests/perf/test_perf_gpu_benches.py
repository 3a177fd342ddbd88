"""`bench decode-floor` and `bench modes` run end to end on CPU in a tiny configuration."""

from __future__ import annotations

import json

from fornax.perf.cli import main
from fornax.perf.gpu_decode_floor import floor_ms
from fornax.perf.schema import validate_record


def test_floor_arithmetic_matches_perf_md() -> None:
    # Llama-3.1-8B: ~15.0 GB of weights, 128 KiB of KV per token; H100 SXM at 3.35 TB/s
    assert abs(floor_ms(15.0e9, 128 * 1024, 1, 1024, 3.35e12) - 4.5) < 0.1
    assert abs(floor_ms(15.0e9, 128 * 1024, 256, 1024, 3.35e12) - 14.7) < 0.3


def test_decode_floor_smoke(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "floor.json"
    assert main(["decode-floor", "--shape", "tiny", "--batch-sizes", "1,2", "--context-len",
                 "24", "--decode-steps", "4", "--dtype", "float32", "--bandwidth-mib", "8",
                 "--output-json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert validate_record(record) == []
    m = record["metrics"]
    for b in (1, 2):
        assert m[f"step_ms_b{b}"] > 0 and m[f"floor_ms_b{b}"] > 0
        assert 0 < m[f"floor_fraction_b{b}"] < 1.5
    assert m["weight_gb_per_step"] > 0 and record["details"]["attention_backend"]


def test_modes_smoke_with_hf_peer(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "modes.json"
    # eager only: the compiled path's CPU compile costs ~40 s here and test_graphs covers it
    assert main(["modes", "--shape", "tiny", "--modes", "eager", "--num-prompts", "3",
                 "--input-len", "8:16", "--output-len", "4:8", "--dtype", "float32",
                 "--max-num-seqs", "4", "--hf-batch-size", "3", "--output-json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert validate_record(record) == []
    assert record["metrics"]["eager_output_throughput"] > 0
    assert record["details"]["modes"]["eager"]["num_output_tokens"] == \
        record["details"]["workload"]["total_output_tokens"]
    assert not record["details"]["modes"]["eager"]["compiled"]
    assert record["peer"]["metrics"]["output_throughput"] > 0
    assert record["ratios"]["eager_output_throughput"] > 0
