"""`bench serve --launch --peer llama.cpp` with a fake llama-server binary; the build script's marker."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fornax.perf import llamacpp_peer
from fornax.perf.cli import main
from helpers.bench import alive, fake_executable, run_bench

FAKE = Path(__file__).with_name("fake_llama_server.py")


@pytest.mark.slow
def test_launch_fornax_then_llamacpp_peer(tiny_model: Callable[..., Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """One run: a real `fornax serve` (prefix caching off) then the peer, same workload; the
    peer's flags follow threads/concurrency/context, every body turns prompt caching off, both
    engines' RSS is recorded and both servers are gone afterwards."""
    log = tmp_path / "fake.jsonl"
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(log))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model = tiny_model("llama")
    rec = run_bench(tmp_path, "serve", "--launch", "--model-path", str(model),
                    "--serve-args", "--max-model-len 256 --dtype float32",
                    "--peer", "llama.cpp",
                    "--peer-binary", str(fake_executable(tmp_path, "llama-server", FAKE)),
                    "--tokenizer", str(model), "--num-prompts", "4", "--input-len", "24:40",
                    "--output-len", "5", "--max-concurrency", "2", "--disable-tqdm")
    # fornax side: the real server, launched with prefix caching off
    server = rec["details"]["server"]
    assert "--no-enable-prefix-caching" in server["cmd"] and str(model) in server["cmd"]
    m = rec["metrics"]
    assert (m["completed"], m["failed"], m["total_output_tokens"]) == (4, 0, 20)
    mem = rec["details"]["memory"]
    engine = next(p for p in mem["processes"] if p["pid"] == mem["engine_pid"])
    assert "fornax.runtime.engine.process" in engine["cmd"]
    assert m["engine_rss_mib"] > 10
    # the peer: llama-server's flags for this workload
    peer = rec["peer"]
    assert peer["name"] == "llama.cpp" and "4242" in peer["version"]
    flags = peer["flags"]
    opts = dict(zip(flags, flags[1:]))
    assert opts["-m"] == str(model)
    assert (opts["-t"], opts["-tb"], opts["-np"]) == ("1", "1", "2")
    ctx = llamacpp_peer.per_request_ctx(40 + 1, 5)  # + BOS at most
    assert int(opts["-c"]) in (2 * ctx, 2 * llamacpp_peer.per_request_ctx(40, 5))
    assert "-cb" in flags and "--no-cache-prompt" in flags and opts["--cache-ram"] == "0"
    assert peer["metrics"]["completed"] == 4 and peer["metrics"]["total_output_tokens"] == 20
    assert 8 <= peer["metrics"]["engine_rss_mib"] < m["engine_rss_mib"]
    assert set(rec["ratios"]) >= {"output_throughput", "median_ttft_ms"}
    # what the fake received: its argv, then warm-up + timed bodies, each without prompt caching
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert entries[0]["argv"] == flags
    bodies = [e["body"] for e in entries[1:]]
    assert len(bodies) == 4 + 1  # one warm-up request
    for body in bodies:
        assert body["cache_prompt"] is False and body["ignore_eos"] is True
        assert body["stream"] is True and isinstance(body["prompt"], str)
    assert sorted(b["max_tokens"] for b in bodies[1:]) == [5] * 4
    for pid in (mem["processes"][0]["pid"], mem["engine_pid"], peer["memory"]["engine_pid"]):
        assert not alive(pid)


def test_peer_without_a_build_says_how_to_build(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SystemExit, match="tools.build_llama_server"):
        llamacpp_peer.resolve_binary(None)
    with pytest.raises(SystemExit, match="--peer-binary"):
        llamacpp_peer.resolve_binary(str(tmp_path / "missing"))


@pytest.mark.parametrize("extra, message", [
    (["--launch", "--base-url", "http://127.0.0.1:1"], "--launch"),
    (["--peer", "llama.cpp", "--peer-base-url", "http://127.0.0.1:1"], "--peer"),
    (["--peer", "llama.cpp", "--peer-args", "'unclosed"], "--peer-args"),
    (["--peer", "llama.cpp", "--peer-threads", "0"], "--peer-threads"),
    (["--peer", "llama.cpp", "--peer-parallel", "x"], "--peer-parallel"),
    (["--peer", "lmdeploy"], "--peer"),
])
def test_peer_flag_errors_exit_2(extra: list[str], message: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--num-prompts", "1", *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_server_command_shape() -> None:
    cmd = llamacpp_peer.server_command(Path("/x/llama-server"), Path("/m.gguf"), 9000, threads=2,
                                       parallel=8, ctx_per_request=768, extra=["-fa", "off"])
    opts = dict(zip(cmd, cmd[1:]))
    assert (opts["-t"], opts["-tb"], opts["-np"], opts["-c"]) == ("2", "2", "8", str(8 * 768))
    assert cmd[-2:] == ["-fa", "off"] and "--no-repack" not in cmd
    cmd = llamacpp_peer.server_command(Path("/x/llama-server"), Path("/m.gguf"), 9000, threads=2,
                                       parallel=1, ctx_per_request=256, extra=["--repack"],
                                       no_repack=True)
    assert cmd[-2:] == ["--no-repack", "--repack"]  # the user's flags come last and win
    assert llamacpp_peer.cpu_has_amx("processor : 0\nflags : fpu avx512f amx_tile amx_int8\n")
    assert not llamacpp_peer.cpu_has_amx("flags : fpu avx2 avx512_bf16\n")
    assert llamacpp_peer.per_request_ctx(512, 128) == 768  # 704 + 16 -> next multiple of 256


# ---- tools/build_llama_server.py: idempotent, marker written last ----------------------------
def _stub_builder(calls: list[Path], fail: bool = False,
                  skip: str = "") -> Callable[[Path, Path, int], dict[str, Any]]:
    def build(work: Path, dest: Path, jobs: int) -> dict[str, Any]:
        calls.append(work)
        if fail:
            raise RuntimeError("compiler exploded")
        (dest / "bin").mkdir(parents=True, exist_ok=True)
        for name in llamacpp_peer.BINARIES:
            if name != skip:
                (dest / "bin" / name).write_text("#!/bin/sh\n")
        return {"llama_cpp_commit": "abc123"}

    return build


def test_build_is_idempotent_and_marker_written_last(tmp_path: Path) -> None:
    from tools.build_llama_server import ensure_built

    cache = tmp_path / "cache"
    calls: list[Path] = []
    with pytest.raises(RuntimeError, match="compiler exploded"):
        ensure_built("9.9.9", jobs=1, cache=cache, builder=_stub_builder(calls, fail=True))
    folder = llamacpp_peer.build_dir("9.9.9", cache)
    assert llamacpp_peer.read_build(folder) is None  # a failed build leaves no marker
    with pytest.raises(RuntimeError, match="lacks one of"):
        ensure_built("9.9.9", jobs=1, cache=cache,
                     builder=_stub_builder(calls, skip="llama-quantize"))
    assert llamacpp_peer.find_binary("llama-server", "9.9.9", cache) is None
    assert ensure_built("9.9.9", jobs=1, cache=cache, builder=_stub_builder(calls)) == folder
    assert len(calls) == 3
    record = llamacpp_peer.read_build(folder)
    assert record is not None and record["llama_cpp_commit"] == "abc123"
    assert record["llama_cpp_python_version"] == "9.9.9" and "-DGGML_NATIVE=ON" in \
        record["cmake_flags"]
    # the second call returns at once: the builder is not called again
    assert ensure_built("9.9.9", jobs=1, cache=cache, builder=_stub_builder(calls)) == folder
    assert len(calls) == 3
    assert llamacpp_peer.find_binary("llama-server", "9.9.9", cache) == folder / "bin" / \
        "llama-server"
