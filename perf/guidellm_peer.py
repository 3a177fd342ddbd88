"""guidellm, the load generator vLLM users run, against `fornax serve` then llama.cpp's llama-server (CLI process).

Issue #20's third-party check: guidellm's `concurrent` profile (default 4 streams), synthetic
prompts of 128 tokens with 32 output tokens (guidellm itself asks for `ignore_eos`), streamed over
`/v1/completions`, against each server in turn on the same GGUF and threads, one server up at a
time, prefix/prompt caching off on both sides. guidellm runs from its own venv
(`perf/run_guidellm.sh` makes it once): its pins would downgrade packages fornax's tests use.
The record holds guidellm's own statistics (output tok/s, TTFT, ITL, TPOT) for both servers;
guidellm's JSON of each run is written beside it without its per-request samples.

    python -m fornax.perf.guidellm_peer --output-dir perf/results/guidellm
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fornax.perf import common, llamacpp_peer
from fornax.perf.managed_server import ManagedServer, free_port
from fornax.perf.serve_peer import ENGINE_MARKER, NO_PREFIX_CACHING, memory, model_path, rss_mib
from fornax.runtime import env

logger = logging.getLogger(__name__)

GUIDELLM_VERSION = "0.8.1"  # what perf/run_guidellm.sh installs
VENV_FOLDER = "guidellm-venv"  # under the fornax cache
SERVERS = ("fornax", "llama.cpp")
# guidellm statistic -> the names the record uses (bench serve's names where they exist)
_DISTRIBUTIONS = {"time_to_first_token_ms": "ttft", "inter_token_latency_ms": "itl",
                  "time_per_output_token_ms": "tpot", "request_latency": "e2el"}
_STATS = {"mean": "mean", "median": "median", "p95": "p95", "p99": "p99"}
HEADLINE = ("output_throughput", "mean_ttft_ms", "median_ttft_ms", "p95_ttft_ms", "mean_itl_ms",
            "median_itl_ms", "p95_itl_ms", "mean_tpot_ms")


def default_guidellm() -> Path:
    from fornax.runtime.loaders.cache_folders import cache_root

    return cache_root() / VENV_FOLDER / "bin" / "guidellm"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guidellm", default=None,
                   help=f"guidellm executable (default: <fornax cache>/{VENV_FOLDER}/bin/guidellm, "
                        "which perf/run_guidellm.sh installs)")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help="which servers to run, in order, comma-separated: fornax, llama.cpp")
    p.add_argument("--model-path", default=None,
                   help="the GGUF both servers load (default: the packaged SmolLM2 GGUF)")
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer folder guidellm sizes its synthetic prompts with (default: "
                        "the folder fornax prepares from the GGUF)")
    p.add_argument("--serve-args", default="",
                   help=f"extra `fornax serve` flags, one string ({NO_PREFIX_CACHING} is added "
                        "unless prefix caching is named)")
    p.add_argument("--peer-binary", default=None, help="llama-server (default: the cached build)")
    p.add_argument("--peer-threads", type=int, default=None,
                   help="llama-server -t/-tb (default: OMP_NUM_THREADS, else all cores)")
    p.add_argument("--peer-args", default="", help="extra llama-server flags, one string")
    p.add_argument("--endpoint", default="/v1/completions",
                   choices=("/v1/completions", "/v1/chat/completions"))
    p.add_argument("--concurrency", type=int, default=4, help="guidellm concurrent streams")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--max-requests", type=int, default=64,
                   help="requests measured per server (after the warm-up ones)")
    p.add_argument("--warmup-requests", type=int, default=4,
                   help="first requests guidellm leaves out of its statistics")
    p.add_argument("--max-seconds", type=float, default=90.0,
                   help="stop a server's run after this long even if --max-requests is not met")
    p.add_argument("--seed", type=int, default=20)
    p.add_argument("--output-dir", default="perf/results/guidellm")
    p.add_argument("--name", default="smollm2_q4_1", help="file name stem of the results")


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = [s for s in servers if s not in SERVERS]
    if not servers or bad:
        parser.error(f"--servers: expected some of {', '.join(SERVERS)}, got {args.servers!r}")
    for flag in ("concurrency", "prompt_tokens", "output_tokens", "max_requests"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.warmup_requests < 0 or args.max_seconds <= 0:
        parser.error("--warmup-requests must be >= 0 and --max-seconds > 0")
    if args.peer_threads is not None and args.peer_threads < 1:
        parser.error("--peer-threads must be >= 1")
    for flag in ("serve_args", "peer_args"):
        try:
            shlex.split(getattr(args, flag))
        except ValueError as exc:
            parser.error(f"--{flag.replace('_', '-')}: {exc}")
    return servers


def scenario(args: argparse.Namespace, target: str, model: str, tokenizer: str,
             body_extra: dict[str, Any], output: Path) -> dict[str, Any]:
    """guidellm's scenario file (`guidellm run --scenario`) for one server."""
    backend: dict[str, Any] = {"kind": "openai_http", "target": target, "model": model,
                               "request_format": args.endpoint, "timeout": 600.0}
    if body_extra:
        backend["extras"] = {"body": dict(body_extra)}
    return {
        "metadata": {"name": f"fornax-issue20-c{args.concurrency}",
                     "description": "fornax perf/guidellm_peer.py"},
        "spec": {
            "backend": backend,
            "profile": {"kind": "concurrent", "streams": [args.concurrency],
                        "warmup": {"value": args.warmup_requests, "mode": "requests"}},
            "data": [{"kind": "synthetic_text", "prompt_tokens": args.prompt_tokens,
                      "output_tokens": args.output_tokens}],
            "tokenizer": {"kind": "huggingface_auto", "model": tokenizer},
            "constraints": [
                {"kind": "max_requests", "count": args.max_requests + args.warmup_requests},
                {"kind": "max_duration", "seconds": args.max_seconds}],
            "seed": {"kind": "static", "value": args.seed},
            "outputs": [{"kind": "json", "path": str(output)}],
        },
    }


def summarize(raw: dict[str, Any]) -> dict[str, float]:
    """The record's metrics from guidellm's JSON (its first benchmark; successful requests)."""
    metrics = raw["benchmarks"][0]["metrics"]
    if not metrics["request_totals"]["successful"]:
        raise RuntimeError("guidellm completed no request (its statistics would all read 0): "
                           "the server is too slow for --max-seconds, or every request failed")
    out: dict[str, float] = {
        "output_throughput": float(metrics["output_tokens_per_second"]["total"]["mean"]),
        "total_token_throughput": float(metrics["tokens_per_second"]["total"]["mean"]),
        "request_throughput": float(metrics["requests_per_second"]["total"]["mean"]),
        "completed": float(metrics["request_totals"]["successful"]),
        "failed": float(metrics["request_totals"]["errored"]
                        + metrics["request_totals"]["incomplete"]),
        "duration_s": float(raw["benchmarks"][0]["duration"]),
    }
    for source, name in _DISTRIBUTIONS.items():
        dist = metrics[source]["successful"]
        if not dist.get("count"):
            # guidellm counts a TTFT only when the first token came after its warm-up window
            logger.warning("guidellm has no %s sample (all before the warm-up's end?)", source)
            continue
        scale = 1000.0 if source == "request_latency" else 1.0  # seconds -> ms
        for stat, label in _STATS.items():
            value = dist[stat] if stat in ("mean", "median") else dist["percentiles"][stat]
            out[f"{label}_{name}_ms"] = float(value) * scale
    return out


def _served_model(url: str) -> str:
    import httpx

    data = httpx.get(f"{url}/v1/models", timeout=30.0).json().get("data") or []
    return str(data[0]["id"]) if data else ""


def _tokenizer(args: argparse.Namespace, model: Path) -> str:
    if args.tokenizer:
        return str(Path(args.tokenizer).expanduser())
    if model.suffix == ".gguf":
        from fornax.runtime.loaders.gguf_loader import prepare_gguf

        return str(prepare_gguf(str(model)))
    return str(model)


def _run_guidellm(binary: Path, spec: dict[str, Any], output: Path, log: Path) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [str(binary), "run", "--scenario", fh.name, "--disable-console-interactive"]
    logger.info("running %s (log %s)", " ".join(cmd), log)
    try:
        with open(log, "wb") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    finally:
        os.unlink(fh.name)
    if proc.returncode != 0 or not output.is_file():
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"guidellm exited with {proc.returncode}:\n{tail}")
    raw: dict[str, Any] = json.loads(output.read_text())
    return raw


def _strip_samples(raw: dict[str, Any]) -> dict[str, Any]:
    """guidellm's JSON without its per-request samples (hundreds of KB per run)."""
    for bench in raw.get("benchmarks", []):
        bench.pop("requests", None)
    return raw


def _one_server(args: argparse.Namespace, which: str, binary: Path, model: Path, tokenizer: str,
                out_dir: Path, stem: str) -> dict[str, Any]:
    port = free_port()
    threads = args.peer_threads or env.OMP_NUM_THREADS.get() or os.cpu_count() or 1
    if which == "fornax":
        extra = shlex.split(args.serve_args)
        if not any("prefix-caching" in flag for flag in extra):
            extra.append(NO_PREFIX_CACHING)
        cmd = [sys.executable, "-m", "fornax.api.cli", "serve", str(model), "--host",
               "127.0.0.1", "--port", str(port), *extra]
        body_extra: dict[str, Any] = {}
        marker: str | None = ENGINE_MARKER
    else:
        llama = llamacpp_peer.resolve_binary(args.peer_binary)
        ctx = llamacpp_peer.per_request_ctx(args.prompt_tokens, args.output_tokens)
        cmd = llamacpp_peer.server_command(llama, model, port, threads=threads,
                                           parallel=args.concurrency, ctx_per_request=ctx,
                                           extra=shlex.split(args.peer_args),
                                           no_repack=llamacpp_peer.cpu_has_amx())
        body_extra = dict(llamacpp_peer.REQUEST_EXTRA)
        marker = None
    raw_path = out_dir / f"{stem}_{which.replace('.', '')}_guidellm.json"
    with ManagedServer(which, cmd, port) as server:
        served = _served_model(server.url)
        spec = scenario(args, server.url, served, tokenizer, body_extra, raw_path)
        started = time.perf_counter()
        raw = _run_guidellm(binary, spec, raw_path, out_dir / f".{stem}_{which}_guidellm.log")
        wall = time.perf_counter() - started
        mem = memory(server.pid, marker)
    raw_path.write_text(json.dumps(_strip_samples(raw), indent=1) + "\n")
    metrics = summarize(raw)
    rss = rss_mib(mem)
    if rss is not None:
        metrics["engine_rss_mib"] = rss
    return {"metrics": metrics, "startup": {"server_start_s": server.start_s},
            "details": {"cmd": cmd, "served_model": served, "scenario": spec,
                        "guidellm_json": str(raw_path), "guidellm_wall_s": wall,
                        "memory": mem}}


def run(args: argparse.Namespace, servers: list[str]) -> dict[str, Any]:
    binary = Path(args.guidellm).expanduser() if args.guidellm else default_guidellm()
    if not binary.is_file():
        raise SystemExit(f"guidellm not found at {binary}: run perf/run_guidellm.sh (it installs "
                         f"guidellm=={GUIDELLM_VERSION} into <fornax cache>/{VENV_FOLDER}) or "
                         "pass --guidellm")
    common.check_threads()
    model = model_path(args)
    tokenizer = _tokenizer(args, model)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = env.OMP_NUM_THREADS.get() or "unset"
    stem = f"{args.name}_c{args.concurrency}_{threads}threads"
    sides = {which: _one_server(args, which, binary, model, tokenizer, out_dir, stem)
             for which in servers}
    record = common.make_record("guidellm", str(model), vars(args))
    record["details"]["guidellm_version"] = GUIDELLM_VERSION
    first = sides.get("fornax") or sides[servers[0]]
    record.update(metrics=first["metrics"], startup=first["startup"])
    record["details"]["server"] = first["details"]
    if "fornax" in sides and "llama.cpp" in sides:
        peer = sides["llama.cpp"]
        record["peer"] = {"name": "llama.cpp", "metrics": peer["metrics"],
                          "startup": peer["startup"], **peer["details"]}
        common.set_ratios(record, [n for n in HEADLINE if n in record["metrics"]])
    elif "fornax" not in sides:
        record["details"]["server_name"] = servers[0]
    common.finish(record, out_dir / f"{stem}.json", _report)
    return record


def _report(record: dict[str, Any]) -> None:
    ours = "fornax" if record["details"].get("server_name") is None else "llama.cpp"
    common.print_comparison(record, HEADLINE, "guidellm, concurrent streams", ours=ours)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fornax.perf.guidellm_peer",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    servers = _check(args, parser)
    from fornax.perf.cli import setup_logging

    setup_logging()
    run(args, servers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
