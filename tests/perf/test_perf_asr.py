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


def test_bench_asr_side_by_side_with_faster_whisper(tmp_path):
    """The faster-whisper peer on the CTranslate2 folder of the same packaged model: both sides'
    WER against the spoken text, the ratios, the decoding settings. faster-whisper is an optional
    extra (fornax[peers]); without it only this peer test skips, the record test above still runs
    fornax's side."""
    pytest.importorskip("faster_whisper", reason="optional peer: pip install -c constraints.txt "
                        "faster-whisper")
    from fornax.perf import bench_asr

    packaged_whisper("whisper-tiny.en")
    out = tmp_path / "asr_fw.json"
    parser = argparse.ArgumentParser()
    bench_asr.add_arguments(parser)
    args = parser.parse_args(["--audio", "mixed", "--seconds", "20", "--repeats", "1", "--peer",
                              "faster-whisper", "--output", str(out)])
    assert bench_asr.run(args) == 0
    record = json.loads(out.read_text())
    assert validate_record(record) == []
    peer = record["peer"]
    assert peer["name"].startswith("faster-whisper") and "float32" in peer["name"]
    assert peer["details"]["decoding"]["beam_size"] == 1
    assert record["metrics"]["wer"] <= 0.2 and peer["metrics"]["wer"] <= 0.2
    assert record["ratios"]["elapsed_s"] > 0 and peer["metrics"]["audio_seconds"] == 20.0
    assert record["details"]["dtype"] in ("bfloat16", "float32")  # auto: the chat engine's rule
