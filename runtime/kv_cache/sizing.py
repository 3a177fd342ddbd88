"""How many KV blocks a runner gets, and the per-layer cache tensors (shared by every runner)."""

from __future__ import annotations

import torch

from fornax.runtime.errors import ConfigError


def full_length_bytes(max_num_reqs: int, max_blocks_per_req: int, bytes_per_block: int,
                      cap: int) -> int:
    """Host default: enough for every sequence slot at full length (plus the null block),
    capped at `cap` bytes."""
    return min(cap, (max_num_reqs * max_blocks_per_req + 1) * bytes_per_block)


def blocks_in_budget(budget: int, bytes_per_block: int) -> int:
    """Whole blocks that fit; fewer than 2 (the null block and one real one) is a config error."""
    num_blocks = budget // bytes_per_block
    if num_blocks < 2:
        raise ConfigError(f"the KV-cache budget ({budget} bytes) holds less than 2 blocks of "
                          f"{bytes_per_block} bytes; raise --kv-cache-memory")
    return int(num_blocks)


def allocate_layer_caches(shape: tuple[int, ...], num_layers: int, dtype: torch.dtype,
                          device: torch.device) -> list[torch.Tensor]:
    """One zeroed cache tensor per layer."""
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
