"""Sleep mode: release the KV cache (level 1) and the weights too (level 2), then wake up
(engine-core process)."""

from __future__ import annotations

import ctypes
import gc
import logging
import time
from typing import Any

import torch

logger = logging.getLogger(__name__)


class SleepState:
    """What a sleeping runner put aside: its level, and host copies of weights (level 1)."""

    def __init__(self) -> None:
        self.level = 0
        self.num_blocks = 0
        self.host_weights: dict[str, torch.Tensor] | None = None

    @property
    def sleeping(self) -> bool:
        return self.level > 0


def put_to_sleep(runner: Any, state: SleepState, level: int) -> None:
    """Level 1: KV cache dropped, weights offloaded to host memory (kept in place on CPU).
    Level 2: KV cache and weights both dropped; waking reloads the weights from disk."""
    if level not in (1, 2):
        raise ValueError(f"sleep level must be 1 or 2, got {level}")
    if state.sleeping:
        return
    start = time.perf_counter()
    state.num_blocks = runner.kv_caches[0].shape[0] if runner.kv_caches else 0
    runner.kv_caches = []
    params = dict(runner.model.named_parameters(remove_duplicate=False))
    if level == 1:
        if runner.device.type != "cpu":
            state.host_weights = {n: p.data.to("cpu", non_blocking=True).pin_memory()
                                  for n, p in params.items()}
            for p in params.values():
                p.data = torch.empty(0, dtype=p.dtype, device=runner.device)
    else:
        from fornax.runtime.kernels.packing import unpack_linear_weights

        unpack_linear_weights(runner.model)
        for p in params.values():
            p.data = torch.empty(0, dtype=p.dtype, device=runner.device)
    state.level = level
    gc.collect()
    if runner.device.type == "cuda":
        torch.cuda.empty_cache()
    _return_freed_host_memory()
    logger.info("asleep at level %d (%.2f s)", level, time.perf_counter() - start)


def wake_up(runner: Any, state: SleepState) -> None:
    """Restore what `put_to_sleep` released; the KV cache comes back empty."""
    if not state.sleeping:
        return
    start = time.perf_counter()
    params = dict(runner.model.named_parameters(remove_duplicate=False))
    if state.level == 1 and state.host_weights is not None:
        for name, p in params.items():
            p.data = state.host_weights[name].to(runner.device)
        state.host_weights = None
    elif state.level == 2:
        with torch.device(runner.device):
            for p in params.values():
                p.data = torch.empty(p.shape if p.numel() else _shape_of(runner, p),
                                     dtype=p.dtype)
        runner.reload_weights()
    runner.initialize_kv_cache(state.num_blocks)
    state.level = 0
    logger.info("awake (%.2f s)", time.perf_counter() - start)


def _return_freed_host_memory() -> None:
    """glibc keeps freed heap memory for reuse; give it back so the process really shrinks."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _shape_of(runner: Any, param: torch.Tensor) -> tuple[int, ...]:
    return runner.param_shapes[id(param)]
