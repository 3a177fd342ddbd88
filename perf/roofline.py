"""The physical floor of an offline workload on this machine: memory bandwidth for decode steps,
matmul FLOP/s for prefill, both measured in the same run with the same threads (CLI process)."""

from __future__ import annotations

import time
from typing import Any

import torch

from fornax.perf.common import median


def measure_read_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Streaming read rate in bytes/s: a sum over a buffer far larger than any cache."""
    buf = torch.ones(num_bytes // 4, dtype=torch.float32)
    buf.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - start)
    return num_bytes / median(times)


def measure_matmul_flops(dtype: torch.dtype, m: int = 4096, k: int = 576, n: int = 1536,
                         repeats: int = 5) -> float:
    """bf16/fp32 matmul rate in FLOP/s at a prefill-like shape (tokens x hidden @ hidden x ffn)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / median(times)


def model_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of every distinct parameter, bytes a decode step streams: all but the embedding
    lookup, unless the embedding is tied to the LM head and so read whole every step)."""
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    total = streamed = 0
    for name, p in model.named_parameters():  # tied parameters are listed once
        size = p.numel() * p.element_size()
        total += size
        if "embed_tokens" not in name or p is head:
            streamed += size
    return total, streamed


def workload_floor(requests: list[Any], *, weight_bytes: int, matmul_params: int,
                   kv_bytes_per_token: int, read_bps: float, matmul_flops: float) -> dict[str, Any]:
    """Seconds the workload needs at the measured ceilings, if nothing else cost anything.

    Decode: every step streams all weights once plus each running sequence's whole KV context
    (sequences join after their prompt and leave after their output). Prefill: 2 FLOPs per
    parameter per prompt token through the matmuls.
    """
    max_out = max(r.output_len for r in requests)
    decode_bytes = 0
    for t in range(1, max_out):  # the first output token comes out of the prefill
        active = [r for r in requests if r.output_len > t]
        decode_bytes += weight_bytes + kv_bytes_per_token * sum(r.prompt_len + t for r in active)
    prompt_tokens = sum(r.prompt_len for r in requests)
    decode_s = decode_bytes / read_bps
    prefill_s = 2 * matmul_params * prompt_tokens / matmul_flops
    return {"read_gbps": read_bps / 1e9, "matmul_gflops": matmul_flops / 1e9,
            "decode_steps": max_out - 1, "decode_gbytes": decode_bytes / 1e9,
            "decode_floor_s": decode_s, "prefill_floor_s": prefill_s,
            "floor_s": decode_s + prefill_s}


def cpu_floor(llm: Any, requests: list[Any]) -> dict[str, Any]:
    """The floor for the engine's model and dtype on this CPU (threads as already set)."""
    runner = llm.engine.runner
    total, matmul = model_bytes(runner.model)
    elem = torch.empty((), dtype=runner.dtype).element_size()
    matmul_params = matmul // elem
    kv_per_token = runner.kv_bytes_per_block() // runner.block_size
    floor = workload_floor(requests, weight_bytes=matmul, matmul_params=matmul_params,
                           kv_bytes_per_token=kv_per_token, read_bps=measure_read_bandwidth(),
                           matmul_flops=measure_matmul_flops(runner.dtype))
    floor.update({"weight_bytes": total, "kv_bytes_per_token": kv_per_token})
    return floor
