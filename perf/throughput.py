"""`fornax bench throughput`: offline generate over a seeded workload, optional HF peer (CLI process)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from fornax.perf import common, offline
from fornax.perf.datasets import DATASETS, build_requests, parse_len_range, workload_summary

logger = logging.getLogger(__name__)

HEADLINE = ("requests_per_s", "output_throughput", "total_token_throughput")
# also reported (and compared): tokens per CPU-second of this process, steadier on a busy machine
RATIO_EXTRA = ("output_throughput_cpu",)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "throughput", help="offline throughput of the engine (optionally vs HF transformers)",
        description="Generate a seeded workload with the offline engine in one timed call "
                    "(ignore_eos, greedy) and report requests/s and tokens/s.")
    p.add_argument("--dataset", choices=DATASETS, default="random")
    p.add_argument("--input-len", default="256",
                   help="prompt tokens: N (spread by --range-ratio) or MIN:MAX")
    p.add_argument("--output-len", default="128",
                   help="output tokens: N (spread by --range-ratio) or MIN:MAX")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths uniform in [N*(1-r), N*(1+r)]")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--prefix-len", type=int, default=0,
                   help="tokens of a prefix shared by every prompt (prefix caching)")
    p.add_argument("--num-iters", type=int, default=1,
                   help="timed repetitions (fresh token ids, same lengths); medians are reported")
    p.add_argument("--output-json", default=None)
    offline.add_engine_args(p)
    p.set_defaults(func=run)
    return p


def _fornax_iteration(llm: Any, requests: list[Any], prompts: list[list[int]],
                      show_progress: bool) -> dict[str, Any]:
    outputs, elapsed, timer, _ = offline.timed_generate(
        llm, prompts, [r.output_len for r in requests], show_progress)
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    expected = sum(r.output_len for r in requests)
    if num_out != expected:
        logger.warning("fornax produced %d output tokens, %d were requested", num_out, expected)
    num_in = sum(len(p) for p in prompts)
    result = {"elapsed_s": elapsed, "requests_per_s": len(requests) / elapsed,
              "output_throughput": num_out / elapsed,
              "total_token_throughput": (num_in + num_out) / elapsed,
              "cpu_s": timer.cpu_s,
              "output_throughput_cpu": num_out / timer.cpu_s if timer.cpu_s else 0.0,
              "num_output_tokens": num_out, "num_input_tokens": num_in,
              "num_cached_tokens": sum(o.num_cached_tokens for o in outputs)}
    result.update(offline.step_summary(timer))
    return result


def _medians(iterations: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in iterations[0].items() if isinstance(v, (int, float))]
    return {k: common.median([float(it[k]) for it in iterations]) for k in keys}


def run(args: argparse.Namespace) -> dict[str, Any]:
    common.check_threads()
    offline.set_threads(args.num_threads)
    input_range = parse_len_range(args.input_len, args.range_ratio)
    output_range = parse_len_range(args.output_len, args.range_ratio)
    show = not args.disable_tqdm

    llm, load_s = offline.build_llm(args)
    upper = offline.vocab_upper(llm)
    requests = build_requests(args.dataset, args.num_prompts, input_range, output_range,
                              seed=args.seed, prefix_len=args.prefix_len, tokenizer=llm.tokenizer,
                              vocab_size=upper)
    avoid = set(getattr(llm.tokenizer, "special_ids", {}).values())
    warmup_s = offline.warm_up(llm, upper, batch=min(4, args.num_prompts),
                               input_len=min(32, input_range[0]), output_len=4, seed=args.seed)
    record = common.make_record("throughput", offline.model_label(args, llm), vars(args))
    record["startup"] = {"load_s": load_s, "warmup_s": warmup_s}

    peer = None
    if args.peer == "hf":
        peer = _make_hf_peer(llm, args, requests)
        record["peer"] = {"name": "hf", "version": peer.version, "dtype": peer.dtype,
                          "attn_implementation": peer.attn_implementation,
                          "startup": {"load_s": peer.load_s, "warmup_s": peer.warmup_s},
                          "metrics": {}, "iterations": []}

    fx_iters: list[dict[str, Any]] = []
    for it in range(max(args.num_iters, 1)):
        prompts = offline.remap_ids(requests, it, upper, avoid)
        fx_iters.append(_fornax_iteration(llm, requests, prompts, show))
        logger.info("fornax iteration %d: %.1f output tok/s", it, fx_iters[-1]["output_throughput"])
        if peer is not None:
            hf_it = peer.throughput(requests, prompts, args.hf_batch_size, show)
            record["peer"]["iterations"].append(hf_it)
            logger.info("hf iteration %d: %.1f output tok/s", it, hf_it["output_throughput"])

    record["metrics"] = _medians(fx_iters)
    if llm.engine.info.device == "cpu":
        from fornax.perf.roofline import cpu_floor

        floor = cpu_floor(llm, requests)
        floor["fornax_fraction"] = floor["floor_s"] / record["metrics"]["elapsed_s"]
        if peer is not None:
            peer_s = _medians(record["peer"]["iterations"])["elapsed_s"]
            floor["peer_fraction"] = floor["floor_s"] / peer_s
        record["roofline"] = floor
    record["details"] = {"workload": workload_summary(requests), "iterations": fx_iters,
                         "engine": _engine_info(llm)}
    if peer is not None:
        record["peer"]["metrics"] = _medians(record["peer"]["iterations"])
        common.set_ratios(record, HEADLINE + RATIO_EXTRA)
    return common.finish(record, args.output_json, print_report)


class _PeerHandle:
    """An HFPeer plus the facts the record needs about it."""

    def __init__(self, peer: Any, version: str, warmup_s: float) -> None:
        self._peer = peer
        self.version = version
        self.warmup_s = warmup_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._peer, name)


def _make_hf_peer(llm: Any, args: argparse.Namespace, requests: list[Any]) -> _PeerHandle:
    import transformers

    peer = offline.hf_peer(llm, args)
    warm_prompts = [list(range(10, 10 + min(32, r.prompt_len)))
                    for r in requests[:min(4, len(requests))]]
    warmup_s = peer.warm_up(warm_prompts, 4)
    return _PeerHandle(peer, transformers.__version__, warmup_s)


def _engine_info(llm: Any) -> dict[str, Any]:
    info = llm.engine.info
    stats = llm.engine.stats()
    return {"dtype": info.dtype, "device": info.device, "num_kv_blocks": info.num_kv_blocks,
            "block_size": info.block_size, "max_model_len": info.max_model_len,
            "prefix_cache_queries": stats.get("prefix_cache_queries"),
            "prefix_cache_hits": stats.get("prefix_cache_hits"),
            "num_preemptions": stats.get("num_preemptions")}


def print_report(record: dict[str, Any]) -> None:
    peer = record.get("peer")
    w = record["details"]["workload"]
    title = (f"throughput: {record['model']} | {w['num_prompts']} prompts, input "
             f"{w['min_input_len']}-{w['max_input_len']}, output "
             f"{w['min_output_len']}-{w['max_output_len']}")
    names = [*HEADLINE, "output_throughput_cpu", "elapsed_s", "cpu_s", "median_decode_step_ms"]
    roof = record.get("roofline")
    extra = []
    if roof:
        extra = [["floor_s (measured ceilings)", roof["floor_s"]]
                 + ([roof["floor_s"], ""] if peer else []),
                 ["fraction of floor", roof["fornax_fraction"]]
                 + ([roof.get("peer_fraction"), ""] if peer else [])]
    common.print_comparison(record, names, title, startup=("load_s", "warmup_s"), extra=extra)
