"""`python -m fornax.perf.guidellm_peer`: guidellm (a fake) against a real `fornax serve` and a fake llama-server."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from fornax.perf import guidellm_peer
from helpers.bench import alive, fake_executable

HERE = Path(__file__).parent


@pytest.mark.slow
def test_fornax_then_llamacpp_under_guidellm(tiny_model: Callable[..., Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """One run: guidellm gets a scenario per server (concurrency, 128/32 synthetic tokens, the
    served model's name, the tokenizer folder, caching off for llama.cpp), while that server is
    up; the record holds guidellm's statistics for both, ratios, its JSON without samples."""
    guide_log, llama_log = tmp_path / "guidellm.jsonl", tmp_path / "llama.jsonl"
    monkeypatch.setenv("FAKE_GUIDELLM_LOG", str(guide_log))
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(llama_log))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model = tiny_model("llama")
    out = tmp_path / "out"
    assert guidellm_peer.main([
        "--guidellm", str(fake_executable(tmp_path, "guidellm", HERE / "fake_guidellm.py")),
        "--peer-binary", str(fake_executable(tmp_path, "llama-server",
                                             HERE / "fake_llama_server.py")),
        "--model-path", str(model), "--serve-args", "--max-model-len 256 --dtype float32",
        "--max-requests", "3", "--output-dir", str(out), "--name", "tiny"]) == 0
    rec = json.loads((out / "tiny_c4_1threads.json").read_text())
    assert rec["kind"] == "guidellm" and rec["peer"]["name"] == "llama.cpp"
    runs = [json.loads(line) for line in guide_log.read_text().splitlines()]
    assert len(runs) == 2
    fornax_spec, llama_spec = (r["scenario"]["spec"] for r in runs)
    for spec in (fornax_spec, llama_spec):
        assert spec["profile"]["kind"] == "concurrent" and spec["profile"]["streams"] == [4]
        assert spec["data"] == [{"kind": "synthetic_text", "prompt_tokens": 128,
                                 "output_tokens": 32}]
        assert spec["tokenizer"]["model"] == str(model)
        assert spec["backend"]["request_format"] == "/v1/completions"
        assert {"kind": "max_requests", "count": 3 + 4} in spec["constraints"]
    # fornax: the real server, prefix caching off, its served model name, no extra body fields
    server = rec["details"]["server"]
    assert "--no-enable-prefix-caching" in server["cmd"] and str(model) in server["cmd"]
    assert fornax_spec["backend"]["model"] == server["served_model"] != ""
    assert "extras" not in fornax_spec["backend"]
    # llama.cpp: 4 slots, prompt caching off in its flags and in every body guidellm sends
    flags = rec["peer"]["cmd"]
    opts = dict(zip(flags, flags[1:]))
    port = llama_spec["backend"]["target"].rsplit(":", 1)[1]
    assert (opts["-np"], opts["-t"], opts["--port"]) == ("4", "1", port)
    assert "--no-cache-prompt" in flags
    assert llama_spec["backend"]["extras"] == {"body": {"cache_prompt": False}}
    bodies = [e["body"] for e in map(json.loads, llama_log.read_text().splitlines())
              if "body" in e]
    assert len(bodies) == 1 and bodies[0]["cache_prompt"] is False
    assert bodies[0]["model"] == "fake-llama.gguf" == llama_spec["backend"]["model"]
    # guidellm's numbers, per server (the fake derives them from the port), and the ratios
    for side, spec in ((rec, fornax_spec), (rec["peer"], llama_spec)):
        base = 10.0 + int(spec["backend"]["target"].rsplit(":", 1)[1]) % 7
        m = side["metrics"]
        assert m["output_throughput"] == pytest.approx(1000.0 / base)
        assert m["median_itl_ms"] == pytest.approx(base * 1.1)
        assert m["p95_ttft_ms"] == pytest.approx(base * 15)
        assert m["mean_e2el_ms"] == pytest.approx(base / 10 * 1.2 * 1000)
        assert (m["completed"], m["failed"]) == (3, 0)
        raw = json.loads(Path(side["guidellm_json"] if side is rec["peer"]
                              else side["details"]["server"]["guidellm_json"]).read_text())
        assert "requests" not in raw["benchmarks"][0] and raw["benchmarks"][0]["metrics"]
    assert rec["metrics"]["engine_rss_mib"] > 10
    assert rec["ratios"]["output_throughput"] == pytest.approx(
        rec["metrics"]["output_throughput"] / rec["peer"]["metrics"]["output_throughput"])
    for mem in (server["memory"], rec["peer"]["memory"]):
        assert not alive(mem["processes"][0]["pid"])


@pytest.mark.parametrize("extra, message", [
    (["--servers", "fornax,vllm"], "--servers"),
    (["--servers", ""], "--servers"),
    (["--concurrency", "0"], "--concurrency"),
    (["--max-requests", "0"], "--max-requests"),
    (["--max-seconds", "0"], "--max-seconds"),
    (["--peer-threads", "0"], "--peer-threads"),
    (["--peer-args", "'unclosed"], "--peer-args"),
])
def test_flag_errors_exit_2(extra: list[str], message: str,
                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        guidellm_peer.main(extra)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_guidellm_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="perf/run_guidellm.sh"):
        guidellm_peer.main(["--guidellm", str(tmp_path / "none"), "--output-dir", str(tmp_path)])


def test_a_statistic_without_samples_is_left_out() -> None:
    """guidellm reports 0 for a distribution with no sample (TTFTs all before its warm-up ended):
    the record leaves the metric out instead of quoting a 0 ms TTFT."""
    def dist(count: int) -> dict[str, object]:
        pct = {"p95": 5.0 * count, "p99": 6.0 * count}
        return {"successful": {"mean": 2.0 * count, "median": 3.0 * count, "count": count,
                               "percentiles": pct}}

    totals = {"successful": 3, "errored": 0, "incomplete": 0, "total": 3}
    rate = {"total": {"mean": 7.0}}
    raw = {"benchmarks": [{"duration": 9.0, "metrics": {
        "request_totals": totals, "output_tokens_per_second": rate, "tokens_per_second": rate,
        "requests_per_second": rate, "time_to_first_token_ms": dist(0),
        "inter_token_latency_ms": dist(1), "time_per_output_token_ms": dist(1),
        "request_latency": dist(1)}}]}
    m = guidellm_peer.summarize(raw)
    assert not any("ttft" in name for name in m)
    assert (m["median_itl_ms"], m["p95_itl_ms"], m["mean_e2el_ms"]) == (3.0, 5.0, 2000.0)


def test_no_completed_request_is_an_error() -> None:
    """A run where nothing finished in time must not become a record of zeros."""
    raw = {"benchmarks": [{"duration": 90.0, "metrics": {
        "request_totals": {"successful": 0, "errored": 0, "incomplete": 4, "total": 4}}}]}
    with pytest.raises(RuntimeError, match="completed no request"):
        guidellm_peer.summarize(raw)
