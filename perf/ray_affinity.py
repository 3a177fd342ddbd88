"""`fornax bench ray-affinity`: Ray Serve's default router vs fornax's prefix-affinity router on a
shared-prefix chat workload: prefix-cache hit rate, throughput, TTFT (CLI process).

For each router it writes a `fornax serve-ray` YAML (the same model, `--replicas` replicas with
prefix caching on, `request_router: default` or `prefix`), starts the application (a local Ray
cluster of its own), sends the same seeded workload (a few long system prompts, many short user
turns, a closed loop of `--concurrency` streams), and reads every replica's
`vllm:prefix_cache_hits`/`queries` counters from the application's merged /metrics before and
after. The routers run one after the other on the same machine: noise on a shared machine hits
them unequally, so rerun on a quiet one before quoting figures.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fornax.perf import common
from fornax.perf.managed_server import ManagedServer, free_port

logger = logging.getLogger(__name__)

ROUTERS = ("default", "prefix")
HEADLINE = ("prefix_hit_rate", "request_throughput", "median_ttft_ms")
_WORDS = ("the a of to and in is it that for on with as was at by an be this from or have not are "
          "but had they his her she he we you one all there their what so up out if about who get "
          "which go me when make can like time no just him know take people into year your good "
          "some could them see other than then now look only come its over think also back after "
          "use two how our work first well way even new want because any these give day most us "
          "policy customer order refund invoice shipping account password warranty product "
          "support ticket escalate manager weekday holiday region currency discount").split()
_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+'
                     r'(?P<value>\S+)')
_REPLICA = re.compile(r'replica="((?:[^"\\]|\\.)*)"')
_COUNTERS = {"vllm:prefix_cache_hits": "hits", "vllm:prefix_cache_queries": "queries",
             "vllm:request_success": "requests", "vllm:prompt_tokens": "prompt_tokens"}


def make_workload(num_systems: int, system_words: int, num_requests: int, user_words: int,
                  seed: int) -> list[tuple[int, list[dict[str, str]]]]:
    """(system index, chat messages) per request: `num_systems` long system prompts, each
    request one of them (seeded, uniform) and a short user turn of its own."""
    rng = random.Random(seed)
    systems = []
    for i in range(num_systems):
        words = " ".join(rng.choice(_WORDS) for _ in range(system_words))
        systems.append(f"You are support agent #{i} of company {rng.randrange(10**6)}. "
                       f"Follow these rules exactly: {words}.")
    out = []
    for k in range(num_requests):
        i = rng.randrange(num_systems)
        question = " ".join(rng.choice(_WORDS) for _ in range(user_words))
        out.append((i, [{"role": "system", "content": systems[i]},
                        {"role": "user", "content": f"Question {k}: {question}?"}]))
    return out


def parse_counters(text: str) -> dict[str, dict[str, float]]:
    """Per replica (its `replica` label), the summed counters of `_COUNTERS` in a Prometheus
    text (a counter's `_total` sample or its bare name; every other label summed over)."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name = match.group("name")
        base = name[:-len("_total")] if name.endswith("_total") else name
        key = _COUNTERS.get(base)
        if key is None:
            continue
        labels = match.group("labels") or ""
        replica = _REPLICA.search(labels)
        try:
            value = float(match.group("value"))
        except ValueError:
            continue
        per = out.setdefault(replica.group(1) if replica else "", {})
        per[key] = per.get(key, 0.0) + value
    return out


def _delta(before: dict[str, dict[str, float]],
           after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {rep: {k: v - before.get(rep, {}).get(k, 0.0) for k, v in vals.items()}
            for rep, vals in after.items()}


def app_config(args: argparse.Namespace, router: str, port: int) -> dict[str, Any]:
    """The `fornax serve-ray` YAML mapping of one side."""
    config: dict[str, Any] = {
        "model": args.model, "host": "127.0.0.1", "port": port,
        "served_model_name": [args.served_name], "max_model_len": args.max_model_len,
        "enable_prefix_caching": True,
        "deployment": {"num_replicas": args.replicas, "request_router": router,
                       "max_ongoing_requests": args.max_ongoing_requests,
                       "ray_actor_options": {"num_cpus": args.replica_cpus}},
    }
    if args.kv_cache_memory:
        config["kv_cache_memory"] = args.kv_cache_memory
    if router == "prefix" and args.imbalance_threshold is not None:
        config["deployment"]["request_router_kwargs"] = {
            "imbalance_threshold": args.imbalance_threshold}
    return config


async def _drive(url: str, model: str, workload: list[tuple[int, list[dict[str, str]]]],
                 concurrency: int, max_tokens: int, timeout: float) -> list[dict[str, Any]]:
    import httpx

    from fornax.perf.datasets import BenchRequest
    from fornax.perf.serve_client import send_request

    results: list[dict[str, Any]] = [{} for _ in workload]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for k in range(len(workload)):
        queue.put_nowait(k)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            k = queue.get_nowait()
            system, messages = workload[k]
            body = {"model": model, "messages": messages, "stream": True, "temperature": 0.0,
                    "max_completion_tokens": max_tokens, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            req = BenchRequest(prompt_len=0, output_len=max_tokens, messages=messages)
            res = await send_request(client, f"{url}/v1/chat/completions", body, req)
            results[k] = {"system": system, "ok": res.success, "ttft": res.ttft,
                          "latency": res.latency, "output_tokens": res.output_tokens,
                          "prompt_tokens": res.prompt_tokens, "start": res.start,
                          "error": res.error}

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


def _metrics_text(url: str) -> str:
    import httpx

    reply = httpx.get(f"{url}/metrics", timeout=30.0)
    reply.raise_for_status()
    return reply.text


def run_side(args: argparse.Namespace, router: str,
             workload: list[tuple[int, list[dict[str, str]]]]) -> dict[str, Any]:
    """Start the application with one router, run the workload, stop it; that side's figures."""
    import yaml  # type: ignore[import-untyped]

    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix=f"fornax-ray-affinity-{router}-"))
    cfg = folder / "app.yaml"
    cfg.write_text(yaml.safe_dump(app_config(args, router, port), sort_keys=False), "utf-8")
    cmd = [sys.executable, "-m", "fornax.api.cli", "serve-ray", str(cfg)]
    with ManagedServer(f"serve-ray-{router}", cmd, port) as server:
        url = server.url
        _wait_replicas(url, args.replicas, args.start_timeout)
        warm = make_workload(1, 8, 2, 4, seed=args.seed + 1000)  # one short untimed request
        asyncio.run(_drive(url, args.served_name, warm, 1, 2, args.timeout))
        before = parse_counters(_metrics_text(url))
        start = time.perf_counter()
        results = asyncio.run(_drive(url, args.served_name, workload, args.concurrency,
                                     args.max_tokens, args.timeout))
        duration = time.perf_counter() - start
        time.sleep(1.0)  # the children's counters are updated by their engine's stats loop
        after = parse_counters(_metrics_text(url))
        start_s = server.start_s
    delta = _delta(before, after)
    return summarize_side(router, results, duration, delta, start_s)


def _wait_replicas(url: str, replicas: int, timeout: float) -> None:
    """/health of the ingress answers once one replica is up; wait until /metrics shows all."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while time.monotonic() < deadline:
        try:
            seen = {r for r in parse_counters(_metrics_text(url)) if r}
        except Exception:  # noqa: BLE001 - not ready yet
            seen = set()
        if len(seen) >= replicas:
            return
        time.sleep(1.0)
    raise RuntimeError(f"only {len(seen)} of {replicas} replicas reported metrics in "
                       f"{timeout:.0f} s")


def summarize_side(router: str, results: list[dict[str, Any]], duration: float,
                   delta: dict[str, dict[str, float]], start_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.get("ok")]
    hits = sum(v.get("hits", 0.0) for v in delta.values())
    queries = sum(v.get("queries", 0.0) for v in delta.values())
    ttft_ms = [1e3 * r["ttft"] for r in ok]
    e2e_ms = [1e3 * r["latency"] for r in ok]
    out_tokens = sum(int(r.get("output_tokens") or 0) for r in ok)
    per_replica = {rep: {k: int(v) for k, v in sorted(vals.items())}
                   for rep, vals in sorted(delta.items()) if rep}
    errors = sorted({r.get("error", "")[:200] for r in results if not r.get("ok")})
    duration = max(duration, 1e-9)
    return {
        "router": router,
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "prefix_hit_rate": hits / queries if queries else float("nan"),
        "prefix_cache_hits": hits, "prefix_cache_queries": queries,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "median_ttft_ms": common.percentile(ttft_ms, 50), "p90_ttft_ms":
            common.percentile(ttft_ms, 90), "median_e2el_ms": common.percentile(e2e_ms, 50),
        "app_start_s": start_s, "per_replica": per_replica, "errors": errors[:5],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    common.check_threads()
    if args.model is None:
        from fornax.runtime.loaders.default_model import default_model_path

        args.model = str(default_model_path())
    routers = [r.strip() for r in args.routers.split(",") if r.strip()]
    for r in routers:
        if r not in ROUTERS:
            raise SystemExit(f"--routers: {r!r} is not one of {', '.join(ROUTERS)}")
    workload = make_workload(args.num_systems, args.system_words, args.num_requests,
                             args.user_words, args.seed)
    record = common.make_record("ray_affinity", args.model, vars(args))
    sides = {}
    for router in routers:
        logger.info("ray-affinity: router %s, %d requests at concurrency %d", router,
                    len(workload), args.concurrency)
        sides[router] = run_side(args, router, workload)
    for router, side in sides.items():
        for key in ("prefix_hit_rate", "request_throughput", "output_throughput",
                    "median_ttft_ms", "p90_ttft_ms", "median_e2el_ms", "completed", "failed"):
            record["metrics"][f"{key}_{router}"] = side[key]
        record["startup"][f"app_start_s_{router}"] = side["app_start_s"]
    record["details"] = {"sides": sides, "note": "routers run one after the other; "
                         "figures from a shared machine are noisy"}
    return common.finish(record, args.output_json, _report)


def _report(record: dict[str, Any]) -> None:
    sides = record["details"]["sides"]
    rows = [[name, f"{s['prefix_hit_rate']:.3f}", f"{s['request_throughput']:.2f}",
             f"{s['output_throughput']:.1f}", f"{s['median_ttft_ms']:.0f}",
             f"{s['p90_ttft_ms']:.0f}", f"{s['completed']}/{s['completed'] + s['failed']}",
             " ".join(str(v.get("requests", 0)) for v in s["per_replica"].values())]
            for name, s in sides.items()]
    common.print_table(rows, ["router", "prefix hit rate", "req/s", "out tok/s", "TTFT p50 ms",
                              "TTFT p90 ms", "ok", "requests per replica"])


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ray-affinity", help="Ray Serve: prefix-affinity vs default routing (needs fornax[ray])",
        description="Run the same shared-prefix chat workload through `fornax serve-ray` with "
                    "Ray Serve's default router and with fornax's prefix-affinity router; "
                    "report prefix-cache hit rate, throughput and TTFT per router.")
    p.add_argument("--model", default=None,
                   help="model of every replica (default: the packaged SmolLM2-135M-Instruct "
                        "GGUF)")
    p.add_argument("--served-name", default="bench")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--replica-cpus", type=float, default=1.0, help="ray_actor_options.num_cpus")
    p.add_argument("--max-ongoing-requests", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-memory", default="256MiB",
                   help="each replica's KV cache (fornax serve --kv-cache-memory)")
    p.add_argument("--routers", default="default,prefix", help="comma list of default, prefix")
    p.add_argument("--imbalance-threshold", type=int, default=None,
                   help="the prefix router's imbalance_threshold (default: the router's)")
    p.add_argument("--num-systems", type=int, default=4, help="distinct long system prompts")
    p.add_argument("--system-words", type=int, default=450,
                   help="words per system prompt (SmolLM2: about 500-700 tokens)")
    p.add_argument("--num-requests", type=int, default=96)
    p.add_argument("--user-words", type=int, default=12)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--start-timeout", type=float, default=600.0,
                   help="seconds for every replica to report metrics")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=run)
    return p
