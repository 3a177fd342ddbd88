"""`fornax bench serve`: streamed HTTP load against any OpenAI-compatible server (CLI process)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fornax.perf import common, llamacpp_peer, serve_peer
from fornax.perf.datasets import (
    DATASETS,
    BenchRequest,
    build_requests,
    parse_len_range,
    workload_summary,
)
from fornax.perf.serve_client import ENDPOINTS, build_payload, run_load, send_request
from fornax.perf.serve_metrics import compute_metrics, length_mismatches, parse_goodput
from fornax.runtime import env

logger = logging.getLogger(__name__)

HEADLINE = ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
            "median_tpot_ms", "median_itl_ms", "median_e2el_ms")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="load-test a running OpenAI-compatible server (fornax, vLLM, ...)",
        description="Send a seeded workload as streamed requests on a Poisson (or fixed, or "
                    "gamma) arrival schedule and report request/s, tok/s, TTFT, TPOT, ITL, E2E.")
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000 (overrides host/port)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--endpoint", choices=ENDPOINTS, default="/v1/completions")
    g.add_argument("--model", default=None, help="model name to send (default: the first of "
                                                  "GET /v1/models)")
    g.add_argument("--api-key", default=env.OPENAI_API_KEY.get())
    g.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    g.add_argument("--peer-base-url", default=None,
                   help="also run the same workload against this server; ratios in one JSON")
    g.add_argument("--peer-model", default=None)
    g.add_argument("--server-pid", type=int, default=None,
                   help="pid of the `fornax serve` at --base-url: records its engine process's "
                        "resident memory after the run")
    serve_peer.add_arguments(p)
    w = p.add_argument_group("workload")
    w.add_argument("--dataset", choices=DATASETS, default="random")
    w.add_argument("--tokenizer", default=None,
                   help="local tokenizer (HF folder, .gguf, or 'default' for the packaged model) "
                        "to build prompts of exact token lengths; without it, random words")
    w.add_argument("--input-len", default="256", help="N (spread by --range-ratio) or MIN:MAX")
    w.add_argument("--output-len", default="128", help="N (spread by --range-ratio) or MIN:MAX")
    w.add_argument("--range-ratio", type=float, default=0.0)
    w.add_argument("--prefix-len", type=int, default=0)
    w.add_argument("--num-prompts", type=int, default=100)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--use-token-ids", action="store_true",
                   help="send completions prompts as token-id arrays (needs --tokenizer)")
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for exactly the requested output lengths (vLLM extra)")
    w.add_argument("--extra-body", default=None, help="JSON merged into every request body")
    t = p.add_argument_group("traffic")
    t.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (inf: all at once)")
    t.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps: 1 = Poisson, < 1 burstier")
    t.add_argument("--arrival", choices=("poisson", "fixed"), default="poisson",
                   help="poisson (gamma with --burstiness) or fixed intervals of 1/rate")
    t.add_argument("--max-concurrency", type=int, default=None)
    t.add_argument("--num-warmups", type=int, default=1, help="requests sent before timing")
    t.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000")
    p.add_argument("--output-json", default=None)
    p.add_argument("--disable-tqdm", action="store_true")
    p.set_defaults(func=run)
    return p


def _load_tokenizer(spec: str | None) -> Any:
    if not spec:
        return None
    from fornax.runtime.text.tokenizer import TokenizerFront

    path = spec
    if spec == "default":
        from fornax.runtime.loaders.default_model import default_model_path

        path = str(default_model_path())
    if str(path).endswith(".gguf"):
        from fornax.runtime.loaders.gguf_loader import prepare_gguf

        path = str(prepare_gguf(path))
    return TokenizerFront(Path(path))


async def _discover_model(client: Any, base_url: str, headers: dict[str, str]) -> str:
    resp = await client.get(f"{base_url}/v1/models", headers=headers)
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model")
    return str(data[0]["id"])


async def _bench_one(base_url: str, model: str | None, args: argparse.Namespace,
                     requests: list[BenchRequest], slos: dict[str, float],
                     server_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Warm up, then run the timed load against one server; returns its part of the record.
    `server_extra` joins every body sent to this server (a peer's own fields)."""
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = args.max_concurrency or len(requests)
    limits = httpx.Limits(max_connections=limit + 4, max_keepalive_connections=limit + 4)
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    extra = {**(server_extra or {}), **(json.loads(args.extra_body) if args.extra_body else {})}
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = model or await _discover_model(client, base_url, headers)
        url = base_url + args.endpoint

        def body(req: BenchRequest) -> dict[str, Any]:
            return build_payload(args.endpoint, model, req, ignore_eos=args.ignore_eos,
                                 temperature=args.temperature, use_token_ids=args.use_token_ids,
                                 extra_body=extra)

        warm_start = time.perf_counter()
        warm_reqs = [BenchRequest(r.prompt_len, min(r.output_len, 16), r.prompt_token_ids,
                                  r.prompt, r.messages)
                     for r in requests[:max(args.num_warmups, 0)]]
        warm = await asyncio.gather(*(send_request(client, url, body(r), r, headers)
                                      for r in warm_reqs))
        warmup_s = time.perf_counter() - warm_start
        if warm and not any(w.success for w in warm):
            raise RuntimeError(f"warm-up request to {url} failed: {warm[0].error}")
        bar = common.progress(len(requests), f"serve {base_url}", not args.disable_tqdm)
        results, start, end = await run_load(
            client, url, [body(r) for r in requests], requests, rate=args.request_rate,
            burstiness=args.burstiness, fixed=args.arrival == "fixed",
            max_concurrency=args.max_concurrency, seed=args.seed, headers=headers, bar=bar)
        bar.close()
    metrics = compute_metrics(results, end - start, [r.prompt_len for r in requests], slos)
    errors = sorted({r.error for r in results if not r.success})[:5]
    for err in errors:
        logger.warning("failed request: %s", err)
    return {"base_url": base_url, "served_model": model, "metrics": metrics,
            "startup": {"warmup_s": warmup_s, "num_warmups": len(warm_reqs)},
            "errors": errors, "output_len_mismatches": length_mismatches(results),
            "requests": [{"ttft_ms": 1e3 * r.ttft, "e2el_ms": 1e3 * r.latency,
                          "output_tokens": r.output_tokens, "num_chunks": r.num_chunks,
                          "success": r.success} for r in results]}


def _usage_error(message: str) -> None:
    sys.stderr.write(f"fornax bench serve: error: {message}\n")
    raise SystemExit(2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    common.check_threads()
    serve_peer.check_args(args, _usage_error)
    if args.request_rate <= 0 or args.burstiness <= 0:
        raise SystemExit("--request-rate and --burstiness must be positive")
    if args.arrival == "fixed" and args.request_rate == float("inf"):
        raise SystemExit("--arrival fixed needs a finite --request-rate")
    slos = parse_goodput(args.goodput)
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    tokenizer = _load_tokenizer(args.tokenizer)
    if args.use_token_ids and tokenizer is None:
        raise SystemExit("--use-token-ids needs --tokenizer")
    requests = build_requests(
        args.dataset, args.num_prompts, parse_len_range(args.input_len, args.range_ratio),
        parse_len_range(args.output_len, args.range_ratio), seed=args.seed,
        prefix_len=args.prefix_len, tokenizer=tokenizer, need_text=True)
    launched = serve_peer.start_fornax(args) if args.launch else None
    try:
        if launched is not None:
            base_url = launched.url
        ours = asyncio.run(_bench_one(base_url, args.model, args, requests, slos))
        memory = serve_peer.memory(launched.pid if launched else args.server_pid,
                                   serve_peer.ENGINE_MARKER)
    finally:
        if launched is not None:
            launched.stop()
    record = common.make_record("serve", ours["served_model"], vars(args))
    record["config"]["base_url"] = base_url
    record["metrics"] = ours.pop("metrics")
    record["startup"] = ours.pop("startup")
    record["details"] = {"workload": workload_summary(requests), "slos_ms": slos, **ours}
    if launched is not None:
        record["details"]["server"] = {"cmd": launched.cmd, "server_start_s": launched.start_s}
    if memory is not None:
        record["details"]["memory"] = memory
        if serve_peer.rss_mib(memory) is not None:
            record["metrics"]["engine_rss_mib"] = serve_peer.rss_mib(memory)
    if args.peer:
        server, info = serve_peer.start_llama(args, requests)
        with server:
            peer = asyncio.run(_bench_one(server.url, args.peer_model, args, requests, slos,
                                          llamacpp_peer.REQUEST_EXTRA))
            info["memory"] = serve_peer.memory(server.pid, None)
        if serve_peer.rss_mib(info["memory"]) is not None:
            peer["metrics"]["engine_rss_mib"] = serve_peer.rss_mib(info["memory"])
        peer.pop("requests")
        record["peer"] = {**info, **peer}
        common.set_ratios(record, HEADLINE)
    elif args.peer_base_url:
        peer = asyncio.run(_bench_one(args.peer_base_url.rstrip("/"), args.peer_model, args,
                                      requests, slos))
        peer.pop("requests")
        record["peer"] = {"name": peer["base_url"], **peer}
        common.set_ratios(record, HEADLINE)
    return common.finish(record, args.output_json, print_report)


def print_report(record: dict[str, Any]) -> None:
    m, cfg = record["metrics"], record["config"]
    title = (f"serve: {record['model']} @ {cfg['base_url']}{cfg['endpoint']} | "
             f"{cfg['num_prompts']} prompts, rate {cfg['request_rate']}, "
             f"concurrency {cfg['max_concurrency'] or 'unbounded'}")
    names = ["completed", "failed", "duration_s", "total_input_tokens", "total_output_tokens",
             "request_throughput", "output_throughput", "total_token_throughput"]
    if "request_goodput" in m:
        names.append("request_goodput")
    for what in ("ttft", "tpot", "itl", "e2el"):
        names += [f"mean_{what}_ms", f"median_{what}_ms", f"p90_{what}_ms", f"p95_{what}_ms",
                  f"p99_{what}_ms"]
    if "engine_rss_mib" in m:
        names.append("engine_rss_mib")
    peer = record["peer"]
    theirs = "llama.cpp" if peer and peer["name"] == "llama.cpp" else "peer"
    common.print_comparison(record, names, title, startup=("warmup_s",), ours="server",
                            theirs=theirs)
