"""`fornax bench asr` writes a valid, tagged record (a short run without the HF peer)."""

from __future__ import annotations

import argparse
import json

import pytest

from fornax.perf.schema import validate_record
from helpers.whisper_fixtures import (
    one_thread,  # noqa: F401 - module fixture, used below
    packaged_whisper,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_bench_asr_record(tmp_path):
    from fornax.perf import bench_asr

    packaged_whisper("whisper-tiny.en")
    out = tmp_path / "asr.json"
    parser = argparse.ArgumentParser()
    bench_asr.add_arguments(parser)
    args = parser.parse_args(["--seconds", "8", "--repeats", "1", "--no-peer", "--output",
                              str(out)])
    assert bench_asr.run(args) == 0
    record = json.loads(out.read_text())
    assert validate_record(record) == [] and record["kind"] == "asr"
    metrics = record["metrics"]
    assert metrics["num_files"] == 1 and metrics["audio_seconds"] == 8.0
    assert 0 < metrics["rtf"] < 5 and metrics["wer"] <= 0.5
