"""Fused bf16 RMSNorm, SiLU-and-multiply and float argmax on CPU through the small C library."""

from __future__ import annotations

import logging
from typing import Protocol, TypeGuard

import torch
from torch import nn

from fornax.runtime.kernels.build import load_fused_ops

logger = logging.getLogger(__name__)


class FusedCpuOps:
    """Callables the layers use in place of their eager torch bodies (bf16 tensors only)."""

    def __init__(self, lib) -> None:
        self._lib = lib

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        dim = x.shape[-1]
        if x.dtype is not torch.bfloat16 or weight.numel() != dim:  # read as dim bf16 values
            raise ValueError(f"fused rms_norm: {x.dtype} rows of {dim} and a weight of "
                             f"{weight.numel()} (bf16 rows of the weight's size)")
        flat = x.dim() == 2  # the decoder's [tokens, hidden]: no reshape or view to dispatch
        rows = x if flat else x.reshape(-1, dim)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = torch.empty((rows.shape[0], dim), dtype=torch.bfloat16)
        self._lib.fornax_rms_norm_bf16(rows.data_ptr(), rows.stride(0), weight.data_ptr(),
                                       out.data_ptr(), rows.shape[0], dim, float(eps),
                                       torch.get_num_threads())
        return out if flat else out.view(x.shape)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not torch.bfloat16 or x.shape[-1] % 2:
            raise ValueError(f"fused silu_mul: {x.dtype} rows of {x.shape[-1]} (bf16 [gate | up])")
        x = x.contiguous()
        dim = x.shape[-1] // 2
        rows = x.numel() // (2 * dim)
        out = torch.empty((*x.shape[:-1], dim), dtype=torch.bfloat16)
        self._lib.fornax_silu_mul_bf16(x.data_ptr(), out.data_ptr(), rows, dim,
                                       torch.get_num_threads())
        return out

    def rotary(self, positions: torch.Tensor, x: torch.Tensor, cos_cache: torch.Tensor,
               sin_cache: torch.Tensor, rotary_dim: int) -> torch.Tensor:
        """Rotate x [T, H, D] (a view whose last dim is contiguous) in place; returns x."""
        if (x.dtype is not torch.bfloat16 or x.dim() != 3 or positions.numel() < x.shape[0]
                or rotary_dim % 2 or not 0 < rotary_dim <= x.shape[2]
                or cos_cache.dtype is not torch.float32 or not cos_cache.is_contiguous()
                or sin_cache.shape != cos_cache.shape or not sin_cache.is_contiguous()):
            raise ValueError(f"fused rotary: {x.dtype} {tuple(x.shape)} with {positions.numel()} "
                             f"positions and rotary_dim {rotary_dim}")
        if x.stride(-1) != 1:
            x = x.contiguous()
        if positions.dtype is not torch.int64 or not positions.is_contiguous():
            positions = positions.to(torch.int64).contiguous()  # read as int64
        self._lib.fornax_rotary_bf16(x.data_ptr(), x.stride(0), x.stride(1), x.shape[0],
                                     x.shape[1], rotary_dim, positions.data_ptr(),
                                     cos_cache.data_ptr(), sin_cache.data_ptr(),
                                     torch.get_num_threads())
        return x


def fast_argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, -1) for 2-D float32 CPU logits; the C loop is vectorized where
    torch's is not (4.5 ms -> well under 1 ms for 32 x 49k on one thread)."""
    lib = load_fused_ops() if logits.device.type == "cpu" else None
    if lib is None or logits.dtype != torch.float32 or logits.dim() != 2 or not logits.numel():
        return logits.argmax(dim=-1)
    logits = logits.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    if lib.fornax_argmax_f32(logits.data_ptr(), logits.shape[0], logits.shape[1],
                             out.data_ptr(), torch.get_num_threads()) != 0:
        return logits.argmax(dim=-1)  # a NaN: keep torch's exact semantics
    return out


def fused_ops_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and load_fused_ops() is not None


class _FusedSlot(Protocol):
    """A module that reads a `fused` slot (RMSNorm, SiluAndMul, RotaryEmbedding)."""

    fused: FusedCpuOps | None


def _has_fused_slot(module: nn.Module) -> TypeGuard[_FusedSlot]:
    return hasattr(module, "fused")


def enable_fused_ops(model: nn.Module) -> int:
    """Point every module with a `fused` slot (RMSNorm, SiluAndMul, RotaryEmbedding) at the
    C kernels."""
    lib = load_fused_ops()
    if lib is None:
        return 0
    ops = FusedCpuOps(lib)
    count = 0
    for module in model.modules():
        if _has_fused_slot(module):
            weight = getattr(module, "weight", None)
            if weight is not None and (weight.dtype != torch.bfloat16 or not weight.is_contiguous()):
                continue
            module.fused = ops
            count += 1
    logger.info("fused bf16 CPU kernels on %d norm/activation modules", count)
    return count
