"""KV-cache sizing on a GPU from a memory profile under --gpu-memory-utilization (engine core).

The budget is what the card may hold (total x utilization) minus what the model needs outside the
KV cache: the peak torch allocation of a dummy forward at the largest step shape (weights plus
activations plus logits), memory held outside torch's allocator (CUDA context, cuBLAS and
FlashInfer workspaces, NCCL), and a reserve for the CUDA-graph pool captured afterwards.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

GiB = 1024**3
GRAPH_POOL_RESERVE = 512 * 1024**2  # decode graphs: activations of the largest bucket, and slack


@dataclass(frozen=True)
class MemoryProfile:
    total: int  # bytes on the card
    free_after: int  # cudaMemGetInfo free bytes after the profiling forward
    torch_peak: int  # torch.cuda.max_memory_allocated during the profile
    torch_reserved: int  # torch.cuda.memory_reserved after the profile

    @property
    def non_torch(self) -> int:
        """Held by the process outside torch's caching allocator (context, libraries)."""
        return max(0, self.total - self.free_after - self.torch_reserved)


def kv_budget_bytes(profile: MemoryProfile, utilization: float, graph_reserve: int = 0) -> int:
    """Bytes the KV cache may take: total x utilization - peak torch - non-torch - graph reserve.

    Negative means the model does not fit at this utilization (the caller reports it)."""
    allowed = int(profile.total * utilization)
    return allowed - profile.torch_peak - profile.non_torch - graph_reserve


def profile_step_memory(runner: Any) -> MemoryProfile:
    """Run the runner's largest step shape once on a throw-away 2-block cache and measure."""
    import torch

    device = runner.device
    torch.cuda.synchronize(device)
    gc.collect()  # an engine dropped earlier in this process may still hold its cache in cycles
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    saved = runner.kv_caches
    runner.kv_caches = [torch.zeros(runner.backend.kv_cache_shape(2), dtype=runner.dtype,
                                    device=device) for _ in range(runner.num_layers)]
    try:
        q_len = min(runner.max_num_tokens, runner.max_model_len)
        num_reqs = max(1, min(runner.max_num_reqs, runner.max_num_tokens // q_len))
        with torch.inference_mode():
            hidden = runner._dummy_forward(num_reqs, q_len)
            # the sampler's logits at the widest batch, in float32 as the sampler makes them
            rows = min(runner.max_num_reqs, hidden.shape[0])
            runner.model.compute_logits(hidden[:rows]).float()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    finally:
        runner.kv_caches = saved
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    profile = MemoryProfile(total=total, free_after=free, torch_peak=peak,
                            torch_reserved=torch.cuda.memory_reserved(device))
    logger.info("memory profile: %.2f GiB total, peak torch %.2f GiB, non-torch %.2f GiB",
                total / GiB, peak / GiB, profile.non_torch / GiB)
    return profile


def gpu_kv_budget(runner: Any, utilization: float, with_graphs: bool) -> int:
    """The KV budget in bytes for this runner on its GPU (see kv_budget_bytes)."""
    profile = profile_step_memory(runner)
    budget = kv_budget_bytes(profile, utilization, GRAPH_POOL_RESERVE if with_graphs else 0)
    logger.info("KV budget under --gpu-memory-utilization %.2f: %.2f GiB", utilization,
                budget / GiB)
    return budget
