"""`fornax bench decode-floor`: time per decode step vs the memory-bandwidth floor (CLI process).

A decode step reads every weight once plus each sequence's KV, so it cannot beat
`(weight bytes + KV bytes) / bandwidth`. This bench measures the card's bandwidth in the same run
(a large device-to-device copy, counting bytes read and written), then runs the engine on a
batch of B sequences of `--context-len` prompt tokens each, and reports the median wall time of
its pure-decode steps (scheduling, forward, sampling and the one sync included) next to the
floor: `floor_fraction_b{B}` = floor / measured (1.0 would be perfect; PERF.md targets 0.85 at
batch 64 and 256 for Llama-3.1-8B on an H100).
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from typing import Any

from fornax.perf import offline
from fornax.perf.common import check_threads, int_list, make_record, median, print_table, write_json

logger = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "decode-floor", help="decode step time vs the HBM bandwidth floor (dummy weights)",
        description="Per-step decode time at several batch sizes against the bandwidth floor "
                    "measured on the same device in the same run.")
    p.add_argument("--shape", default="llama-3.1-8b",
                   help="built-in shape (perf/gpu_shapes.py) when --model is not given")
    p.add_argument("--model", default=None, help="an HF folder instead of a built-in shape")
    p.add_argument("--batch-sizes", default="1,64,256")
    p.add_argument("--context-len", type=int, default=1024, help="prompt tokens per sequence")
    p.add_argument("--decode-steps", type=int, default=32, help="timed decode steps per batch")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--enforce-eager", action="store_true", help="no compile, no CUDA graphs")
    p.add_argument("--no-cuda-graphs", action="store_true", help="compiled, without graphs")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--bandwidth-mib", type=int, default=2048,
                   help="size of the copy that measures bandwidth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=run)
    return p


def measure_bandwidth(device: str, mib: int, repeats: int = 10) -> float:
    """Bytes per second of a large copy (read + write counted), median of `repeats`."""
    import torch

    n = mib * 1024 * 1024
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return 2 * n / median(times)


def kv_bytes_per_token(runner: Any) -> int:
    return runner.kv_bytes_per_block() // runner.block_size


def floor_ms(weight_bytes: int, kv_per_token: int, batch: int, mean_context: float,
             bandwidth: float) -> float:
    """The bandwidth floor of one decode step in milliseconds."""
    return 1e3 * (weight_bytes + batch * mean_context * kv_per_token) / bandwidth


def _random_prompts(batch: int, length: int, upper: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, upper) for _ in range(length)] for _ in range(batch)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fornax.perf.gpu_shapes import shape_dir, weight_bytes_read_per_step
    from fornax.runtime import LLM

    check_threads()
    batches = sorted(set(int_list(args.batch_sizes)))
    model_path = args.model or str(shape_dir(args.shape))
    max_len = args.context_len + args.decode_steps + 16
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = measure_bandwidth(device, args.bandwidth_mib)  # before the KV cache takes memory
    if device == "cuda":
        torch.cuda.empty_cache()
    start = time.perf_counter()
    llm = LLM(model_path, load_format="dummy", dtype=args.dtype, seed=args.seed,
              max_model_len=max_len, max_num_seqs=max(batches),
              enable_prefix_caching=False, enforce_eager=args.enforce_eager or None,
              use_cuda_graphs=not args.no_cuda_graphs,
              gpu_memory_utilization=args.gpu_memory_utilization)
    load_s = time.perf_counter() - start
    engine = llm.engine
    runner = engine.runner
    if str(runner.device.type) != device:
        raise SystemExit(f"the engine runs on {runner.device.type}, bandwidth measured on {device}")
    weights = weight_bytes_read_per_step(runner.model)
    kv_tok = kv_bytes_per_token(runner)
    upper = offline.vocab_upper(llm)
    record = make_record("decode_floor", args.model or args.shape, vars(args))
    graphs = runner.graph_runner
    record["startup"] = {"load_s": load_s, "compile_capture_s": engine.compile_seconds,
                         "capture_s": graphs.capture_seconds if graphs else 0.0}
    offline.warm_up(llm, upper, batch=min(4, max(batches)), input_len=32, output_len=4,
                    seed=args.seed)
    metrics: dict[str, float] = {"bandwidth_gb_s": bandwidth / 1e9,
                                 "weight_gb_per_step": weights / 1e9,
                                 "kv_kib_per_token": kv_tok / 1024}
    rows = []
    for i, batch in enumerate(batches):
        prompts = _random_prompts(batch, args.context_len, upper, args.seed + 1000 * (i + 1))
        replays_before = graphs.num_replays if graphs else 0
        _, _, timer, _ = offline.timed_generate(
            llm, prompts, [args.decode_steps + 1] * batch, use_tqdm=False)
        decode = [1e3 * (s.end - s.start) for s in timer.steps
                  if s.num_first_tokens == 0 and s.num_outputs == batch]
        step_ms = median(decode)
        fl = floor_ms(weights, kv_tok, batch, args.context_len + args.decode_steps / 2,
                      bandwidth)
        metrics[f"step_ms_b{batch}"] = step_ms
        metrics[f"floor_ms_b{batch}"] = fl
        metrics[f"floor_fraction_b{batch}"] = fl / step_ms if step_ms else 0.0
        metrics[f"output_throughput_b{batch}"] = 1e3 * batch / step_ms if step_ms else 0.0
        metrics[f"graph_replays_b{batch}"] = (graphs.num_replays - replays_before
                                              if graphs else 0)
        rows.append([batch, step_ms, fl, metrics[f"floor_fraction_b{batch}"], len(decode)])
    record["metrics"] = metrics
    record["details"] = {"device_kind": device, "attention_backend": runner.backend.name,
                         "compiled": runner.compiled, "graph_sizes": graphs.sizes if graphs
                         else [], "max_model_len": max_len}
    write_json(record, args.output_json)
    print_table(rows, ["batch", "step ms", "floor ms", "floor / step", "decode steps"],
                f"decode floor: {record['model']} on {record['device']['name']}, "
                f"{bandwidth / 1e9:.0f} GB/s, {weights / 1e9:.2f} GB weights per step")
    return record
