"""`fornax bench modes`: one offline workload through eager, compiled and CUDA-graph engines, and
HF transformers `generate`, side by side in one run (CLI process).

The default workload is nano-vllm's: 256 sequences, input and output lengths uniform in
[100, 1024], `ignore_eos`, greedy, on a Qwen3-0.6B shape with random weights. Each mode builds its
own engine (start-up cost reported apart: load, compile, graph capture), warms it, runs one timed
`generate` over the same token ids, and is torn down before the next mode starts.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from typing import Any

from fornax.perf import offline
from fornax.perf.common import check_threads, make_record, print_table, write_json
from fornax.perf.datasets import build_requests, parse_len_range, workload_summary

logger = logging.getLogger(__name__)

MODES = {  # mode -> engine keyword arguments
    "eager": {"enforce_eager": True},
    "compiled": {"enforce_eager": False, "use_cuda_graphs": False},
    "graphs": {"enforce_eager": False, "use_cuda_graphs": True},
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "modes", help="eager vs compiled vs CUDA graphs (and HF generate) on one workload",
        description="nano-vllm's workload by default: 256 sequences, lengths in [100, 1024].")
    p.add_argument("--shape", default="qwen3-0.6b", help="built-in shape (perf/gpu_shapes.py)")
    p.add_argument("--model", default=None, help="an HF folder instead of a built-in shape")
    p.add_argument("--modes", default="eager,compiled,graphs")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", default="100:1024")
    p.add_argument("--output-len", default="100:1024")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--peer", choices=("none", "hf"), default="hf")
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=run)
    return p


def _free_device_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_mode(mode: str, model_path: str, args: argparse.Namespace, prompts: list[list[int]],
              output_lens: list[int], max_len: int) -> dict[str, Any]:
    from fornax.runtime import LLM

    kwargs: dict[str, Any] = {"load_format": "dummy", "dtype": args.dtype, "seed": args.seed,
                              "max_model_len": max_len, "max_num_seqs": args.max_num_seqs,
                              "gpu_memory_utilization": args.gpu_memory_utilization,
                              **MODES[mode]}
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    start = time.perf_counter()
    llm = LLM(model_path, **kwargs)
    load_s = time.perf_counter() - start
    upper = offline.vocab_upper(llm)
    warm_s = offline.warm_up(llm, upper, batch=4, input_len=32, output_len=4, seed=args.seed)
    outputs, elapsed, timer, _ = offline.timed_generate(llm, prompts, output_lens, use_tqdm=False)
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    runner = llm.engine.runner
    graphs = runner.graph_runner
    result = {"load_s": load_s, "compile_capture_s": llm.engine.compile_seconds,
              "warmup_s": warm_s, "elapsed_s": elapsed, "num_output_tokens": num_out,
              "output_throughput": num_out / elapsed,
              "total_token_throughput": (num_out + sum(map(len, prompts))) / elapsed,
              "attention_backend": runner.backend.name, "compiled": runner.compiled,
              "graph_replays": graphs.num_replays if graphs else 0,
              "num_kv_blocks": llm.engine.info.num_kv_blocks}
    result.update(offline.step_summary(timer))
    del llm, outputs, runner, graphs
    _free_device_memory()
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fornax.perf.gpu_shapes import shape_dir

    check_threads()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    model_path = args.model or str(shape_dir(args.shape))
    in_range = parse_len_range(args.input_len, 0.0)
    out_range = parse_len_range(args.output_len, 0.0)
    requests = build_requests("random", args.num_prompts, in_range, out_range, seed=args.seed,
                              vocab_size=500)
    prompts = [list(r.prompt_token_ids or []) for r in requests]
    output_lens = [r.output_len for r in requests]
    max_len = in_range[1] + out_range[1] + 16
    record = make_record("modes", args.model or args.shape, vars(args))
    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        logger.info("mode %s ...", mode)
        results[mode] = _run_mode(mode, model_path, args, prompts, output_lens, max_len)
        logger.info("mode %s: %.1f output tok/s", mode, results[mode]["output_throughput"])
    record["startup"] = {f"{m}_{k}": results[m][k] for m in modes
                         for k in ("load_s", "compile_capture_s", "warmup_s")}
    record["metrics"] = {f"{m}_{k}": results[m][k] for m in modes
                         for k in ("output_throughput", "elapsed_s", "median_decode_step_ms",
                                   "num_output_tokens")}
    record["details"] = {"workload": workload_summary(requests), "modes": results}
    if args.peer == "hf":
        record["peer"] = _hf_peer(model_path, args, requests, prompts)
        hf_tp = record["peer"]["metrics"]["output_throughput"]
        record["ratios"] = {f"{m}_output_throughput": results[m]["output_throughput"] / hf_tp
                            for m in modes}
    write_json(record, args.output_json)
    rows = [[m, results[m]["output_throughput"], results[m]["elapsed_s"],
             results[m].get("median_decode_step_ms"), results[m]["compile_capture_s"],
             record["ratios"].get(f"{m}_output_throughput", "")] for m in modes]
    if record["peer"]:
        pm = record["peer"]["metrics"]
        rows.append(["hf generate", pm["output_throughput"], pm["elapsed_s"],
                     pm.get("median_decode_step_ms"), 0.0, 1.0])
    print_table(rows, ["mode", "output tok/s", "elapsed s", "decode step ms", "start-up s",
                       "vs hf"], f"modes: {record['model']} on {record['device']['name']}")
    return record


def _hf_peer(model_path: str, args: argparse.Namespace, requests: list[Any],
             prompts: list[list[int]]) -> dict[str, Any]:
    import torch
    import transformers

    from fornax.perf.hf_peer import HFPeer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    peer = HFPeer(model_path, args.dtype, random_weights=True, seed=args.seed, eos_token_id=2,
                  device=device)
    warm_s = peer.warm_up([list(range(10, 42))] * 4, 4)
    metrics = peer.throughput(requests, prompts, args.hf_batch_size, show_progress=False)
    out = {"name": "hf", "version": transformers.__version__, "dtype": args.dtype,
           "device": device, "batch_size": args.hf_batch_size,
           "attention_implementation": peer.attn_implementation,
           "startup": {"load_s": peer.load_s, "warmup_s": warm_s}, "metrics": metrics}
    del peer
    _free_device_memory()
    return out
