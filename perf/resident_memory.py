"""`fornax bench memory`: the engine process's resident memory of a `fornax serve MODEL` it starts
itself (ready, peak under a workload, idle after it, after a structured-output request), against
issue #20's bound: the model file + the KV cache + 300 MB (CLI process)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fornax.perf import common
from fornax.perf.datasets import BenchRequest, random_requests
from fornax.perf.managed_server import ManagedServer, engine_pids, free_port, rss_detail
from fornax.perf.serve_client import RequestResult, build_payload, send_request

logger = logging.getLogger(__name__)

MIB = 2**20
ALLOWANCE_BYTES = 300 * 10**6  # issue #20: file + KV cache + 300 MB (decimal megabytes)
DEFAULT_KV = "2GiB"  # fornax serve's KV cache on CPU by default (all slots at full length, <= 2 GiB)
IDLE_S = 2.0  # the engine returns its free heap pages after 0.5 s idle
ENDPOINT = "/v1/completions"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"]}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from fornax.api.server.args import parse_size

    p = subparsers.add_parser(
        "memory", help="the engine's resident memory against file + KV cache + 300 MB",
        description="Start `fornax serve MODEL` with a given KV cache, read the engine process's "
                    "RSS (/proc) when ready, at its peak during a streamed workload, idle after "
                    "it and after one structured-output request; compare each with the model "
                    "file + KV cache + 300 MB (issue #20's target).")
    p.add_argument("--model-path", default=None,
                   help="a .gguf file or model folder (default: the packaged SmolLM2 GGUF)")
    p.add_argument("--kv-cache-memory", type=parse_size, default=parse_size(DEFAULT_KV),
                   help=f"the server's --kv-cache-memory, counted in the bound (default "
                        f"{DEFAULT_KV}, the CPU default)")
    p.add_argument("--serve-args", default="--max-model-len 2048",
                   help="extra `fornax serve` flags, one string")
    p.add_argument("--num-prompts", type=int, default=16, help="requests of the workload")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--input-len", type=int, default=256, help="prompt words")
    p.add_argument("--output-len", type=int, default=64, help="output tokens (ignore_eos)")
    p.add_argument("--no-structured", action="store_true",
                   help="skip the structured-output request (xgrammar loads on the first one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=run)
    return p


def _model(args: argparse.Namespace) -> Path:
    if args.model_path:
        return Path(args.model_path).expanduser()
    from fornax.runtime.loaders.default_model import default_model_path

    return default_model_path()


def model_bytes(path: Path) -> int:
    """The model's size on disk: the file, or every file of a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def mapped(pid: int, fragment: str) -> bool:
    """Whether a file whose path contains `fragment` is mapped into `pid` (a loaded library)."""
    try:
        return fragment in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _snapshot(pid: int) -> dict[str, Any]:
    """RSS and its split (anonymous, file-backed, shared) in MiB; whether xgrammar is loaded."""
    detail = rss_detail(pid)
    return {**{k.replace("_bytes", "_mib"): v / MIB for k, v in detail.items()},
            "xgrammar_loaded": mapped(pid, "xgrammar")}


def _served_name(url: str) -> str:
    import httpx

    return str(httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"])


async def _workload(url: str, name: str, requests: list[BenchRequest], concurrency: int,
                    schema: dict[str, Any] | None = None) -> list[RequestResult]:
    """The requests, `concurrency` at a time (with `schema`: its JSON output constraint)."""
    import httpx

    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600.0) as client:
        async def one(req: BenchRequest) -> RequestResult:
            body = build_payload(ENDPOINT, name, req, ignore_eos=schema is None,
                                 temperature=0.0, use_token_ids=False, extra_body=None)
            if schema is not None:
                body["structured_outputs"] = {"json": schema}
            async with limit:
                result = await send_request(client, url + ENDPOINT, body, req)
            if not result.success:
                logger.error("request failed: %s", result.error)
            return result

        return list(await asyncio.gather(*(one(r) for r in requests)))


def _structured_ttfts(url: str, name: str, req: BenchRequest) -> list[RequestResult]:
    """Three constrained requests one after another: the first loads xgrammar and compiles
    SCHEMA, the second finds it cached, the third compiles another schema."""
    other = {**SCHEMA, "properties": {**SCHEMA["properties"], "city": {"type": "string"}}}
    return [asyncio.run(_workload(url, name, [req], 1, schema))[0]
            for schema in (SCHEMA, SCHEMA, other)]


def _peak_during(pid: int, work: Any) -> tuple[float, Any]:
    """Run `work()` while sampling `pid`'s RSS every 50 ms; (the highest in MiB, its result)."""
    most, stop = [0.0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            most[0] = max(most[0], rss_detail(pid).get("rss_bytes", 0) / MIB)
            time.sleep(0.05)

    sampler = threading.Thread(target=watch, daemon=True)
    sampler.start()
    try:
        result = work()
    finally:
        stop.set()
        sampler.join()
    return most[0], result


def run(args: argparse.Namespace) -> dict[str, Any]:
    import shlex

    common.check_threads()
    model = _model(args)
    if not model.exists():
        raise SystemExit(f"--model-path {args.model_path}: no such file or folder")
    file_mib, kv_mib = model_bytes(model) / MIB, args.kv_cache_memory / MIB
    bound_mib = file_mib + kv_mib + ALLOWANCE_BYTES / MIB
    record = common.make_record("memory", model.name, vars(args))
    requests = random_requests(args.num_prompts, (args.input_len, args.input_len),
                               (args.output_len, args.output_len), seed=args.seed,
                               need_text=True)
    port = free_port()
    cmd = [sys.executable, "-m", "fornax.api.cli", "serve", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--kv-cache-memory", str(args.kv_cache_memory),
           "--disable-log-requests", *shlex.split(args.serve_args)]
    phases: dict[str, dict[str, Any]] = {}
    with ManagedServer("fornax", cmd, port) as server:
        record["startup"] = {"start_s": server.start_s}
        pids = engine_pids(server.pid)
        if len(pids) != 1:
            raise SystemExit(f"expected one engine process, found {pids}")
        pid, name = pids[0], _served_name(server.url)
        time.sleep(IDLE_S)
        phases["ready"] = _snapshot(pid)
        peak, results = _peak_during(pid, lambda: asyncio.run(
            _workload(server.url, name, requests, args.concurrency)))
        time.sleep(IDLE_S)
        phases["after_requests"] = {**_snapshot(pid), "peak_rss_mib": peak}
        structured: list[RequestResult] = []
        if not args.no_structured:
            structured = _structured_ttfts(server.url, name, requests[0])
            time.sleep(IDLE_S)
            phases["after_structured"] = _snapshot(pid)
    failed = [r.error for r in results + structured if not r.success]
    if failed:
        raise SystemExit(f"{len(failed)} request(s) failed ({failed[0]}); see {server.log_path}")
    metrics: dict[str, float] = {"file_mib": file_mib, "kv_cache_mib": kv_mib,
                                 "bound_mib": bound_mib}
    for name, snap in phases.items():
        metrics[f"{name}_rss_mib"] = snap["rss_mib"]
        metrics[f"{name}_margin_mib"] = bound_mib - snap["rss_mib"]
    metrics["peak_rss_mib"] = phases["after_requests"]["peak_rss_mib"]
    for label, result in zip(("first", "cached", "new_schema"), structured, strict=False):
        metrics[f"structured_{label}_ttft_ms"] = 1000 * result.ttft
    record["metrics"] = metrics
    record["details"] = {"phases": phases, "engine_command": cmd,
                         "note": "bound = model file + --kv-cache-memory + 300 MB (10^6 bytes);"
                                 " the engine allocates whole KV blocks within the budget",
                         "pid": pid,
                         "load_average_1m": os.getloadavg()[0]}
    return common.finish(record, args.output_json, print_report)


def print_report(record: dict[str, Any]) -> None:
    m = record["metrics"]
    print(f"model {record['model']}: file {m['file_mib']:.0f} MiB + KV cache "
          f"{m['kv_cache_mib']:.0f} MiB + 300 MB = {m['bound_mib']:.0f} MiB")
    rows = [[name, f"{snap['rss_mib']:.0f}", f"{snap.get('rss_anon_mib', 0):.0f}",
             f"{snap.get('rss_file_mib', 0):.0f}", f"{m['bound_mib'] - snap['rss_mib']:+.0f}",
             "yes" if snap["xgrammar_loaded"] else "no"]
            for name, snap in record["details"]["phases"].items()]
    rows.append(["peak (workload)", f"{m['peak_rss_mib']:.0f}", "", "",
                 f"{m['bound_mib'] - m['peak_rss_mib']:+.0f}", ""])
    common.print_table(rows, ["engine RSS", "MiB", "anon", "file", "under the bound", "xgrammar"])
    if "structured_first_ttft_ms" in m:
        print(f"structured-output TTFT: first {m['structured_first_ttft_ms']:.0f} ms (loads "
              f"xgrammar), same schema again {m['structured_cached_ttft_ms']:.0f} ms, a new "
              f"schema {m['structured_new_schema_ttft_ms']:.0f} ms")
