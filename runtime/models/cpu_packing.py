"""bf16 linear weights pre-packed into oneDNN's blocked layout on CPU, so no matmul repacks them."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

logger = logging.getLogger(__name__)


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN packs bf16 weights on x86 CPUs; float32 packing is not reliably faster or equal."""
    return (device.type == "cpu" and dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                  out_features: int) -> torch.Tensor:
    """x @ W^T (+ b) with W pre-packed; same values as F.linear (tests check bit equality)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], out_features)


def pack_linear_weights(model: nn.Module) -> int:
    """Give every module with a `packed_weight` slot a oneDNN copy of its weight; returns count.

    Plain `F.linear` on bf16 reorders the weight into oneDNN's layout on every call, which at
    decode batch sizes costs as much as the matmul itself.
    """
    start = time.perf_counter()
    count = 0
    for module in model.modules():
        if hasattr(module, "packed_weight") and module.weight.numel():
            module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(
                module.weight.detach(), None)
            count += 1
    logger.info("packed %d bf16 linear weights for oneDNN in %.2f s", count,
                time.perf_counter() - start)
    return count


def unpack_linear_weights(model: nn.Module) -> None:
    """Drop the packed copies (sleep level 2 frees the weights; wake-up packs again)."""
    for module in model.modules():
        if hasattr(module, "packed_weight"):
            module.packed_weight = None
