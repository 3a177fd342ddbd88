"""`fornax bench compare`: regressions flagged per metric direction, identical runs pass, plot."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from fornax.perf.cli import main
from fornax.perf.common import make_record
from fornax.perf.compare import EXIT_BAD_INPUT, EXIT_OK, EXIT_REGRESSION, compare_records


def _throughput(tok_s: float = 100.0, step_ms: float = 20.0, speedup: float | None = None
                ) -> dict[str, Any]:
    rec = make_record("throughput", "tiny", {"num_prompts": 8, "output_json": "x.json"})
    rec["metrics"] = {"requests_per_s": tok_s / 50, "output_throughput": tok_s,
                      "total_token_throughput": 3 * tok_s, "median_decode_step_ms": step_ms}
    rec["startup"] = {"load_s": 1.0, "warmup_s": 0.5}
    if speedup is not None:
        rec["peer"] = {"name": "hf", "metrics": {}, "startup": {}}
        rec["ratios"] = {"output_throughput": speedup}
    return rec


def _latency(median_s: float) -> dict[str, Any]:
    rec = make_record("latency", "tiny", {"batch_size": 4})
    rec["metrics"] = {"median_latency_s": median_s, "p99_latency_s": median_s * 1.1,
                      "mean_ttft_ms": 30.0, "mean_tpot_ms": 10.0}
    rec["startup"] = {"load_s": 1.0, "warmup_s": 0.5}
    return rec


def _write(tmp_path: Path, name: str, rec: dict[str, Any]) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(rec))
    return str(path)


def test_identical_pair_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _write(tmp_path, "base.json", _throughput())
    new = _write(tmp_path, "new.json", _throughput())
    assert main(["compare", base, new, "--threshold", "0.05"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "output_throughput" in out and "no regression" in out


def test_twenty_percent_throughput_drop_fails(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    base = _write(tmp_path, "base.json", _throughput(100.0))
    new = _write(tmp_path, "new.json", _throughput(80.0))
    assert main(["compare", base, new, "--threshold", "0.05"]) == EXIT_REGRESSION
    assert "REGRESSION" in capsys.readouterr().out
    # the same drop passes a looser threshold; a gain never fails
    assert main(["compare", base, new, "--threshold", "0.25"]) == EXIT_OK
    assert main(["compare", new, base]) == EXIT_OK


def test_lower_is_better_metrics(tmp_path: Path) -> None:
    base = _write(tmp_path, "base.json", _latency(1.0))
    slower = _write(tmp_path, "slower.json", _latency(1.2))
    faster = _write(tmp_path, "faster.json", _latency(0.8))
    assert main(["compare", base, slower]) == EXIT_REGRESSION
    assert main(["compare", base, faster]) == EXIT_OK
    rows = {r["metric"]: r for r in compare_records(_latency(1.0), _latency(1.2), 0.05)}
    assert rows["median_latency_s"]["status"] == "REGRESSION"
    assert rows["median_latency_s"]["higher_is_better"] is False
    assert rows["median_latency_s"]["ratio"] == pytest.approx(1.2)
    assert rows["mean_ttft_ms"]["status"] == "ok"


def test_peer_speedup_is_compared(tmp_path: Path) -> None:
    """A drop of the side-by-side speedup vs HF (machine noise cancels in it) is a regression."""
    rows = {r["metric"]: r for r in compare_records(_throughput(speedup=4.0),
                                                    _throughput(speedup=3.0), 0.05)}
    assert rows["speedup_vs_hf:output_throughput"]["status"] == "REGRESSION"
    rows = {r["metric"]: r for r in compare_records(_throughput(speedup=4.0),
                                                    _throughput(speedup=4.1), 0.05)}
    assert rows["speedup_vs_hf:output_throughput"]["status"] == "ok"


def test_bad_inputs_exit_2(tmp_path: Path) -> None:
    base = _write(tmp_path, "base.json", _throughput())
    wrong_version = _throughput()
    wrong_version["schema_version"] = 999
    assert main(["compare", base, _write(tmp_path, "v.json", wrong_version)]) == EXIT_BAD_INPUT
    assert main(["compare", base, _write(tmp_path, "l.json", _latency(1.0))]) == EXIT_BAD_INPUT
    (tmp_path / "junk.json").write_text("{not json")
    assert main(["compare", base, str(tmp_path / "junk.json")]) == EXIT_BAD_INPUT
    assert main(["compare", base]) == EXIT_BAD_INPUT


def test_plot_history_and_json(tmp_path: Path) -> None:
    runs = []
    for i, tok_s in enumerate((100.0, 104.0, 97.0, 101.0)):
        rec = _throughput(tok_s)
        rec["commit"] = f"{i:07d}abcdef"
        runs.append(_write(tmp_path, f"run{i}.json", rec))
    png, table = tmp_path / "hist.png", tmp_path / "cmp.json"
    assert main(["compare", *runs, "--plot", str(png), "--output-json", str(table)]) == EXIT_OK
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    data = json.loads(table.read_text())
    assert data["regressions"] == [] and data["base"].endswith("run0.json")
    assert {r["metric"] for r in data["rows"]} >= {"output_throughput", "requests_per_s"}


def test_config_mismatch_warns_but_compares(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    other = copy.deepcopy(_throughput())
    other["config"]["num_prompts"] = 16
    other["config"]["output_json"] = "elsewhere.json"  # volatile: not reported
    rc = main(["compare", _write(tmp_path, "a.json", _throughput()),
               _write(tmp_path, "b.json", other)])
    assert rc == EXIT_OK
    assert "config differs in: num_prompts" in caplog.text


def test_kind_without_headline_list_uses_directional_metrics(tmp_path: Path) -> None:
    """A benchmark kind added later (no headline list here yet) still gets checked."""
    def rec(rate: float) -> dict[str, Any]:
        r = make_record("future-kind", "m", {})
        r["metrics"] = {"items_per_s": rate, "wall_s": 10.0, "num_items": 5}
        return r

    assert main(["compare", _write(tmp_path, "a.json", rec(10.0)),
                 _write(tmp_path, "b.json", rec(10.0))]) == EXIT_OK
    assert main(["compare", _write(tmp_path, "c.json", rec(10.0)),
                 _write(tmp_path, "d.json", rec(7.0))]) == EXIT_REGRESSION
