"""`fornax bench throughput` and `latency` end to end on a tiny dummy model, with the HF peer."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from fornax.perf.cli import add_bench_parser
from fornax.perf.datasets import build_requests, parse_len_range
from helpers.bench import run_bench


def test_throughput_json_schema_and_peer(tiny_model: Callable[..., Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    rec = run_bench(tmp_path, "throughput", "--model", str(tiny_model("llama")),
                    "--load-format", "dummy", "--num-prompts", "6", "--input-len", "16:40",
                    "--output-len", "4:12", "--prefix-len", "16", "--peer", "hf",
                    "--hf-batch-size", "4", "--disable-tqdm")
    assert rec["config"]["num_prompts"] == 6
    work = rec["details"]["workload"]
    assert rec["metrics"]["num_output_tokens"] == work["total_output_tokens"]  # ignore_eos held
    assert 16 + 16 <= work["min_input_len"] and work["max_input_len"] <= 16 + 40
    # the shared 16-token prefix was served from the prefix cache for later prompts
    assert rec["metrics"]["num_cached_tokens"] >= 16
    peer = rec["peer"]
    assert peer["name"] == "hf" and peer["metrics"]["num_batches"] == 2
    assert peer["metrics"]["generated_tokens"] >= work["total_output_tokens"]
    ratio = rec["ratios"]["output_throughput"]
    assert ratio == pytest.approx(rec["metrics"]["output_throughput"]
                                  / peer["metrics"]["output_throughput"])
    assert rec["startup"]["load_s"] > 0 and rec["startup"]["warmup_s"] > 0
    assert "speedup" in capsys.readouterr().out


def test_latency_json_schema(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    rec = run_bench(tmp_path, "latency", "--model", str(tiny_model("llama")),
                    "--load-format", "dummy", "--batch-size", "2", "--input-len", "8",
                    "--output-len", "6", "--num-iters-warmup", "1", "--num-iters", "3",
                    "--peer", "hf", "--disable-tqdm")
    assert len(rec["details"]["iterations"]) == 3  # warm-up iterations are not measured
    assert rec["startup"]["warmup_s"] > 0
    m = rec["metrics"]
    assert m["p99_latency_s"] >= m["median_latency_s"] > 0
    assert 0 < m["mean_ttft_ms"] < 1e3 * m["mean_latency_s"]
    assert all(it["num_steps"] == 6 for it in rec["details"]["iterations"])
    assert set(rec["ratios"]) >= {"median_latency_s", "mean_tpot_ms"}
    assert len(rec["peer"]["iterations"]) == 3


def test_synthetic_chat_workload_is_seeded(tiny_model: Callable[..., Path]) -> None:
    from fornax.runtime.text.tokenizer import TokenizerFront

    tok = TokenizerFront(tiny_model("llama"))
    a = build_requests("synthetic-chat", 4, (20, 40), (5, 9), seed=7, prefix_len=12, tokenizer=tok)
    b = build_requests("synthetic-chat", 4, (20, 40), (5, 9), seed=7, prefix_len=12, tokenizer=tok)
    assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]
    assert all(r.messages and r.prompt_token_ids for r in a)
    assert len({r.messages[0]["content"] for r in a}) == 1  # one shared system prompt
    assert all(5 <= r.output_len <= 9 for r in a)
    special = set(tok.special_ids.values())
    rand = build_requests("random", 3, (10, 10), (4, 4), seed=1, prefix_len=5, tokenizer=tok)
    assert all(r.prompt_len == 15 and not special & set(r.prompt_token_ids or []) for r in rand)
    assert len({tuple((r.prompt_token_ids or [])[:5]) for r in rand}) == 1


def test_len_ranges() -> None:
    assert parse_len_range("64:512", 0.9) == (64, 512)
    assert parse_len_range("100", 0.5) == (50, 150)
    assert parse_len_range(7, 0.0) == (7, 7)
    with pytest.raises(ValueError):
        parse_len_range("10:5", 0.0)


def test_bench_parser_hooks_into_a_host_cli() -> None:
    parser = argparse.ArgumentParser(prog="fornax")
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "compare", "a.json", "b.json", "--threshold", "0.1"])
    assert args.bench_command == "compare" and args.threshold == 0.1 and callable(args.func)
    args = parser.parse_args(["bench", "serve", "--goodput", "ttft:500", "tpot:50"])
    assert args.request_rate == float("inf") and args.goodput == ["ttft:500", "tpot:50"]


def test_module_entry_point_runs_standalone() -> None:
    proc = subprocess.run([sys.executable, "-m", "fornax.perf", "bench", "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0
    assert all(cmd in proc.stdout for cmd in ("throughput", "latency", "serve", "compare"))


@pytest.mark.slow
def test_hf_peer_of_a_gguf_runs_its_dequantized_weights(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine keeps a GGUF quantized in a folder HF cannot read (it would initialize every
    layer at random and only warn): the peer loads the dequantized folder of the same file, and
    HFPeer refuses a folder that lacks weights."""
    import torch
    from safetensors.torch import load_file

    from fornax.perf.hf_peer import HFPeer
    from fornax.perf.offline import hf_peer
    from fornax.runtime.loaders.gguf_loader import prepare_gguf
    from fornax.runtime.loaders.model_files import resolve_model_files
    from helpers.gguf_models import write_llama_gguf

    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FORNAX_GGUF_DEQUANTIZE", "0")
    gguf = write_llama_gguf(tmp_path / "tiny.gguf")
    files = resolve_model_files(str(gguf))
    assert files.path == prepare_gguf(gguf, quantized=True)  # what the engine loads
    engine = argparse.Namespace(files=files, info=argparse.Namespace(eos_token_ids={0},
                                                                     dtype="float32"))
    peer = hf_peer(argparse.Namespace(engine=engine),
                   argparse.Namespace(load_format="auto", seed=0))
    dense = load_file(str(prepare_gguf(gguf) / "model.safetensors"))
    for name, param in peer.model.state_dict().items():
        if name in dense:
            assert torch.equal(param, dense[name].to(param.dtype)), name
    assert torch.equal(peer.model.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                       dense["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(RuntimeError, match="lacks"):
        HFPeer(files.path, "float32", random_weights=False, seed=0)
