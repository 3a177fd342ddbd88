"""`fornax bench latency`: end-to-end time of one fixed batch, warm-up excluded (CLI process)."""

from __future__ import annotations

import argparse
import logging
import random
from typing import Any

from fornax.perf import common, offline

logger = logging.getLogger(__name__)

HEADLINE = ("median_latency_s", "p99_latency_s", "mean_ttft_ms", "mean_tpot_ms",
            "output_throughput", "output_throughput_cpu")
DETAIL_PERCENTILES = (10, 25, 50, 75, 90, 99)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "latency", help="latency of one fixed batch (optionally vs HF transformers)",
        description="Time `generate` of a fixed batch of random prompts, after warm-up "
                    "iterations; report latency percentiles, time to first token and per token.")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters-warmup", type=int, default=3)
    p.add_argument("--num-iters", type=int, default=10)
    p.add_argument("--output-json", default=None)
    offline.add_engine_args(p)
    p.set_defaults(func=run)
    return p


def _batch(rng: random.Random, batch: int, length: int, upper: int,
           avoid: set[int]) -> list[list[int]]:
    prompts = []
    for _ in range(batch):
        ids: list[int] = []
        while len(ids) < length:
            tid = rng.randrange(upper)
            if tid not in avoid:
                ids.append(tid)
        prompts.append(ids)
    return prompts


def _fornax_iter(llm: Any, prompts: list[list[int]], output_len: int) -> dict[str, float]:
    _, elapsed, timer, start = offline.timed_generate(
        llm, prompts, [output_len] * len(prompts), use_tqdm=False)
    firsts = [t - start for t in timer.first_token_at.values()]
    ttft = max(firsts) if firsts else elapsed
    return {"latency_s": elapsed, "ttft_s": ttft, "mean_request_ttft_s": sum(firsts) / len(firsts),
            "tpot_s": (elapsed - ttft) / (output_len - 1) if output_len > 1 else 0.0,
            "num_steps": len(timer.steps), "cpu_s": timer.cpu_s}


def _hf_iter(peer: Any, prompts: list[list[int]], output_len: int) -> dict[str, float]:
    run = peer.generate(prompts, output_len)
    ttft = run.ttft_s
    return {"latency_s": run.elapsed_s, "ttft_s": ttft, "mean_request_ttft_s": ttft,
            "tpot_s": (run.elapsed_s - ttft) / (output_len - 1) if output_len > 1 else 0.0,
            "num_steps": len(run.step_times), "cpu_s": run.cpu_s}


def _metrics(iters: list[dict[str, float]], batch: int, output_len: int) -> dict[str, float]:
    lat = [it["latency_s"] for it in iters]
    m = common.summarize(lat, "latency", "s")
    m["mean_ttft_ms"] = 1e3 * sum(it["ttft_s"] for it in iters) / len(iters)
    m["mean_tpot_ms"] = 1e3 * sum(it["tpot_s"] for it in iters) / len(iters)
    m["output_throughput"] = batch * output_len / m["median_latency_s"]
    cpu = sorted(it["cpu_s"] for it in iters)
    m["output_throughput_cpu"] = batch * output_len / cpu[len(cpu) // 2] if cpu[0] else 0.0
    return m


def _loop(name: str, fn: Any, batches: list[list[list[int]]], warmups: int,
          show: bool) -> tuple[list[dict[str, float]], float]:
    """Run warm-up iterations (timed apart) then measured ones; returns (measured, warm-up s)."""
    bar = common.progress(len(batches), f"{name} latency", show)
    warm_s = 0.0
    measured = []
    for i, prompts in enumerate(batches):
        it = fn(prompts)
        if i < warmups:
            warm_s += it["latency_s"]
        else:
            measured.append(it)
        bar.update(1)
    bar.close()
    return measured, warm_s


def run(args: argparse.Namespace) -> dict[str, Any]:
    common.check_threads()
    offline.set_threads(args.num_threads)
    if args.num_iters < 1 or args.batch_size < 1 or args.input_len < 1 or args.output_len < 1:
        raise SystemExit("--num-iters, --batch-size, --input-len and --output-len must be >= 1")
    show = not args.disable_tqdm
    llm, load_s = offline.build_llm(args)
    upper = offline.vocab_upper(llm)
    avoid = set(getattr(llm.tokenizer, "special_ids", {}).values())
    rng = random.Random(args.seed)
    total = args.num_iters_warmup + args.num_iters
    batches = [_batch(rng, args.batch_size, args.input_len, upper, avoid) for _ in range(total)]

    record = common.make_record("latency", offline.model_label(args, llm), vars(args))
    fx, fx_warm = _loop("fornax", lambda p: _fornax_iter(llm, p, args.output_len), batches,
                        args.num_iters_warmup, show)
    record["startup"] = {"load_s": load_s, "warmup_s": fx_warm}
    record["metrics"] = _metrics(fx, args.batch_size, args.output_len)
    lat = [it["latency_s"] for it in fx]
    record["details"] = {
        "iterations": fx,
        "latency_percentiles_s": {str(p): common.percentile(lat, p) for p in DETAIL_PERCENTILES},
        "tokens_per_iteration": args.batch_size * args.output_len,
    }
    if args.peer == "hf":
        import transformers

        peer = offline.hf_peer(llm, args)
        hf, hf_warm = _loop("hf", lambda p: _hf_iter(peer, p, args.output_len), batches,
                            args.num_iters_warmup, show)
        record["peer"] = {"name": "hf", "version": transformers.__version__, "dtype": peer.dtype,
                          "attn_implementation": peer.attn_implementation,
                          "startup": {"load_s": peer.load_s, "warmup_s": hf_warm},
                          "metrics": _metrics(hf, args.batch_size, args.output_len),
                          "iterations": hf}
        common.set_ratios(record, HEADLINE)
    return common.finish(record, args.output_json, print_report)


def print_report(record: dict[str, Any]) -> None:
    cfg = record["config"]
    names = ["mean_latency_s", "median_latency_s", "p90_latency_s", "p99_latency_s",
             "mean_ttft_ms", "mean_tpot_ms", "output_throughput", "output_throughput_cpu"]
    common.print_comparison(
        record, names, f"latency: {record['model']} | batch {cfg['batch_size']}, input "
        f"{cfg['input_len']}, output {cfg['output_len']}, {cfg['num_iters']} iters",
        startup=("load_s", "warmup_s"))
