"""`fornax bench many-models`: one `fornax serve --models A B` it starts itself, the same streamed
load on each model alone and on both together → each model's output tok/s alone vs beside the
other, and the server's total; then the time to first token of a request for a loaded model, an
asleep one (idle_action sleep, put to sleep by keep_alive 0) and an unloaded one (CLI process)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any

from fornax.perf import common
from fornax.perf.datasets import BenchRequest, random_requests
from fornax.perf.managed_server import ManagedServer, engine_pids, free_port, rss_bytes
from fornax.perf.serve_client import RequestResult, build_payload, send_request

logger = logging.getLogger(__name__)

NAMES = ("m1", "m2")
ENDPOINT = "/v1/completions"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "many-models", help="two models in one fornax serve: throughput together vs alone",
        description="Start `fornax serve --models A B` (default: the packaged SmolLM2 twice), "
                    "then per repeat run the same closed-loop streamed load on m1 alone, m2 "
                    "alone and both at once; report each model's output tok/s and the total.")
    p.add_argument("--model", default=None, help="first model (default: the packaged SmolLM2)")
    p.add_argument("--model-b", default=None, help="second model (default: the same as --model)")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS of each engine (default 1: two engines on two cores)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight per model")
    p.add_argument("--num-prompts", type=int, default=16, help="requests per model per phase")
    p.add_argument("--input-len", type=int, default=128, help="prompt words")
    p.add_argument("--output-len", type=int, default=64, help="output tokens (ignore_eos)")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats (medians)")
    p.add_argument("--swap-repeats", type=int, default=3,
                   help="requests timed for each of loaded, asleep and unloaded (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=run)
    return p


def _server_cmd(args: argparse.Namespace, port: int) -> list[str]:
    from fornax.runtime.loaders.default_model import default_model_path

    first = args.model or str(default_model_path())
    entries = [{"model": model, "served_model_name": name, "dtype": args.dtype,
                "max_model_len": args.max_model_len, "idle_action": "sleep"}
               for model, name in zip((first, args.model_b or first), NAMES, strict=True)]
    return [sys.executable, "-m", "fornax.api.cli", "serve", "--host", "127.0.0.1", "--port",
            str(port), "--models", *map(json.dumps, entries), "--disable-log-requests"]


async def _load(client: Any, url: str, name: str, requests: list[BenchRequest],
                concurrency: int) -> list[RequestResult]:
    """Closed loop: `concurrency` requests of this model in flight until all are answered."""
    limit = asyncio.Semaphore(concurrency)

    async def one(req: BenchRequest) -> RequestResult:
        body = build_payload(ENDPOINT, name, req, ignore_eos=True, temperature=0.0,
                             use_token_ids=False, extra_body=None)
        async with limit:
            return await send_request(client, url + ENDPOINT, body, req)

    return list(await asyncio.gather(*(one(r) for r in requests)))


def _summary(results: list[RequestResult], seconds: float) -> dict[str, float]:
    ok = [r for r in results if r.success]
    if len(ok) != len(results):
        bad = next(r for r in results if not r.success)
        raise RuntimeError(f"{len(results) - len(ok)} request(s) failed: {bad.error}")
    tpots = [t for r in ok if (t := r.tpot) is not None]
    return {"output_throughput": sum(r.output_tokens for r in ok) / seconds,
            "median_ttft_ms": 1000 * common.median([r.ttft for r in ok]),
            "median_tpot_ms": 1000 * common.median(tpots) if tpots else 0.0}


async def _phase(url: str, names: tuple[str, ...], requests: list[BenchRequest],
                 concurrency: int) -> dict[str, dict[str, float]]:
    """One phase: the load on each model of `names` at once, each timed over its own run."""
    import time

    import httpx

    async with httpx.AsyncClient(timeout=600.0) as client:
        async def timed(name: str) -> tuple[list[RequestResult], float]:
            began = time.perf_counter()
            results = await _load(client, url, name, requests, concurrency)
            return results, time.perf_counter() - began

        done = await asyncio.gather(*(timed(n) for n in names))
    return {n: _summary(res, s) for n, (res, s) in zip(names, done, strict=True)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    common.check_threads()
    requests = random_requests(args.num_prompts, (args.input_len, args.input_len),
                               (args.output_len, args.output_len), seed=args.seed,
                               need_text=True)
    record = common.make_record("many_models", args.model or "SmolLM2-135M-Instruct", vars(args))
    port = free_port()
    env = {"OMP_NUM_THREADS": str(args.threads)}
    phases: dict[str, list[dict[str, dict[str, float]]]] = {"m1": [], "m2": [], "both": []}
    with ManagedServer("many-models", _server_cmd(args, port), port, env=env) as server:
        record["startup"] = {"start_s": server.start_s}
        asyncio.run(_phase(server.url, NAMES, requests[:2], 2))  # warm-up, untimed
        for repeat in range(args.repeats):
            for phase, names in (("m1", NAMES[:1]), ("m2", NAMES[1:]), ("both", NAMES)):
                phases[phase].append(asyncio.run(_phase(server.url, names, requests,
                                                        args.concurrency)))
                logger.info("repeat %d %s: %s", repeat + 1, phase, phases[phase][-1])
        record["details"]["engine_rss_bytes"] = [
            rss for pid in engine_pids(server.pid) if (rss := rss_bytes(pid))]
        swaps: dict[str, list[float]] = {}
        for state in ("loaded", "asleep", "unloaded") if args.swap_repeats else ():
            for _ in range(args.swap_repeats):
                seconds, rss = _first_token_s(server.url, state, server.pid)
                swaps.setdefault(state, []).append(seconds)
                record["details"].setdefault("engines_rss_bytes_before", {})[state] = rss
    metrics: dict[str, float] = {}
    for name in NAMES:
        alone = common.median([p[name]["output_throughput"] for p in phases[name]])
        beside = common.median([p[name]["output_throughput"] for p in phases["both"]])
        metrics[f"{name}_alone_output_throughput"] = alone
        metrics[f"{name}_together_output_throughput"] = beside
        metrics[f"{name}_together_over_alone"] = beside / alone
        for key in ("median_ttft_ms", "median_tpot_ms"):
            metrics[f"{name}_alone_{key}"] = common.median([p[name][key] for p in phases[name]])
            metrics[f"{name}_together_{key}"] = common.median(
                [p[name][key] for p in phases["both"]])
    total = common.median([sum(p[n]["output_throughput"] for n in NAMES) for p in phases["both"]])
    metrics["together_total_output_throughput"] = total
    metrics["together_total_over_alone_mean"] = total / (
        (metrics["m1_alone_output_throughput"] + metrics["m2_alone_output_throughput"]) / 2)
    for state, seconds in swaps.items():
        metrics[f"{state}_ttft_s"] = common.median(seconds)
        metrics[f"{state}_engines_rss_bytes"] = record["details"]["engines_rss_bytes_before"][state]
    record["details"]["ttft_s"] = swaps
    record["metrics"] = metrics
    record["details"]["phases"] = phases
    record["details"]["load_average_1m"] = os.getloadavg()[0]
    return common.finish(record, args.output_json, print_report)


def _first_token_s(url: str, state: str, server_pid: int) -> tuple[float, int]:
    """Put m2 in `state` (asleep: a request with keep_alive 0 on its idle_action sleep; unloaded:
    POST unload), then time one streamed request's first token; also the engines' RSS in all
    (both models) just before it."""
    import time

    import httpx

    body = {"model": NAMES[1], "prompt": "Once upon a time", "max_tokens": 4, "stream": True}
    if state == "asleep":
        httpx.post(url + ENDPOINT, json={**body, "stream": False, "keep_alive": 0}, timeout=600)
    elif state == "unloaded":
        httpx.post(f"{url}/v1/models/{NAMES[1]}/unload", timeout=600).raise_for_status()
    else:
        httpx.post(url + ENDPOINT, json={**body, "stream": False}, timeout=600)
    deadline = time.monotonic() + 120
    while _status(url, NAMES[1]) != state:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{NAMES[1]} did not become {state}")
        time.sleep(0.2)
    rss = sum(rss_bytes(pid) or 0 for pid in engine_pids(server_pid))
    began = time.perf_counter()
    with httpx.stream("POST", url + ENDPOINT, json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data:") and '"text":' in line:
                return time.perf_counter() - began, rss
    raise RuntimeError("the stream carried no text")


def _status(url: str, name: str) -> str:
    import httpx

    cards = httpx.get(url + "/v1/models", timeout=30).json()["data"]
    return str(next(c["status"] for c in cards if c["id"] == name))


def print_report(record: dict[str, Any]) -> None:
    m = record["metrics"]
    rows = [[name, m[f"{name}_alone_output_throughput"], m[f"{name}_together_output_throughput"],
             m[f"{name}_together_over_alone"], m[f"{name}_alone_median_tpot_ms"],
             m[f"{name}_together_median_tpot_ms"]] for name in NAMES]
    rows.append(["total", "", m["together_total_output_throughput"],
                 m["together_total_over_alone_mean"], "", ""])
    common.print_table(rows, ["model", "alone tok/s", "together tok/s", "together/alone",
                              "TPOT alone ms", "TPOT together ms"])
    swaps = [[state, m[f"{state}_ttft_s"], m[f"{state}_engines_rss_bytes"] / 2**30]
             for state in ("loaded", "asleep", "unloaded") if f"{state}_ttft_s" in m]
    if swaps:
        common.print_table(swaps, ["m2 before the request", "time to first token s",
                                   "engines' RSS GiB"])
