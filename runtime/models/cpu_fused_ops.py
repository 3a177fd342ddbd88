"""Fused bf16 RMSNorm and SiLU-and-multiply on CPU through the small C library (eager only)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from fornax.runtime.attention.native_kernels import load_fused_ops

logger = logging.getLogger(__name__)


class FusedCpuOps:
    """Callables the layers use in place of their eager torch bodies (bf16 tensors only)."""

    def __init__(self, lib) -> None:
        self._lib = lib

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        dim = x.shape[-1]
        rows = x.reshape(-1, dim)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = torch.empty((rows.shape[0], dim), dtype=torch.bfloat16)
        self._lib.fornax_rms_norm_bf16(rows.data_ptr(), rows.stride(0), weight.data_ptr(),
                                       out.data_ptr(), rows.shape[0], dim, float(eps),
                                       torch.get_num_threads())
        return out.view(x.shape)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        dim = x.shape[-1] // 2
        rows = x.numel() // (2 * dim)
        out = torch.empty((*x.shape[:-1], dim), dtype=torch.bfloat16)
        self._lib.fornax_silu_mul_bf16(x.data_ptr(), out.data_ptr(), rows, dim,
                                       torch.get_num_threads())
        return out


def fused_ops_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and load_fused_ops() is not None


def enable_fused_ops(model: nn.Module) -> int:
    """Point every module with a `fused` slot (RMSNorm, SiluAndMul) at the C kernels."""
    lib = load_fused_ops()
    if lib is None:
        return 0
    ops = FusedCpuOps(lib)
    count = 0
    for module in model.modules():
        if hasattr(module, "fused"):
            weight = getattr(module, "weight", None)
            if weight is not None and (weight.dtype != torch.bfloat16 or not weight.is_contiguous()):
                continue
            module.fused = ops
            count += 1
    logger.info("fused bf16 CPU kernels on %d norm/activation modules", count)
    return count
