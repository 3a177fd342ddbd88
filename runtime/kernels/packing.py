"""bf16 linear weights pre-packed on CPU (oneDNN's blocked layout, AMX tiles) so no matmul repacks them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol, TypeGuard

import torch
from torch import nn

from fornax.runtime import env
from fornax.runtime.kernels.amx_linear import (
    AMX_MAX_ROWS,
    amx_linear,
    amx_supported,
    pack_for_amx,
)

logger = logging.getLogger(__name__)

_BOTH_PACKS_MAX_BYTES = 2 << 30  # beyond this many bytes of linear weights, auto packs AMX only


@dataclass
class PackedWeight:
    """A linear layer's weight in the layouts its CPU kernels read."""

    out_features: int
    onednn: torch.Tensor | None = None
    amx: torch.Tensor | None = None


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN packs bf16 weights on x86 CPUs; float32 packing is not reliably faster or equal."""
    return (device.type == "cpu" and dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def packed_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T (+ b) through the pack that suits the number of rows (same values as F.linear)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if packed.amx is not None and (rows <= AMX_MAX_ROWS or packed.onednn is None):
        return amx_linear(x, packed.amx, bias, packed.out_features)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, packed.onednn, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], packed.out_features)


def linear_kind() -> str:
    """FORNAX_CPU_LINEAR: auto (AMX tiles for decode-sized batches, oneDNN above: two packs),
    onednn (oneDNN only), amx (AMX only: one pack, larger batches slower)."""
    return env.CPU_LINEAR.get()


def pack_weight(weight: torch.Tensor, kind: str = "auto") -> PackedWeight:
    """The packs of one weight for `kind` (see FORNAX_CPU_LINEAR); oneDNN is the fallback."""
    weight = weight.detach()
    packed = PackedWeight(weight.shape[0])
    if kind != "onednn" and amx_supported():
        packed.amx = pack_for_amx(weight)
    if packed.amx is None or kind != "amx":
        packed.onednn = torch.ops.mkldnn._reorder_linear_weight(weight, None)
    return packed


class _PackSlot(Protocol):
    """A layer that reads a `packed_weight` slot (ColumnParallelLinear, VocabParallelEmbedding)."""

    weight: torch.Tensor
    packed_weight: PackedWeight | None


def _has_pack_slot(module: nn.Module) -> TypeGuard[_PackSlot]:
    return hasattr(module, "packed_weight")


def pack_linear_weights(model: nn.Module) -> int:
    """Give every module with a `packed_weight` slot packed copies of its weight; returns count.

    Plain `F.linear` on bf16 reorders the weight into oneDNN's layout on every call, which at
    decode batch sizes costs as much as the matmul itself.
    """
    start = time.perf_counter()
    kind = linear_kind()
    modules = [m for m in model.modules() if _has_pack_slot(m) and m.weight.numel()]
    total = sum(m.weight.numel() * m.weight.element_size() for m in modules)
    if kind == "auto" and total > _BOTH_PACKS_MAX_BYTES:
        kind = "amx"  # a second full copy of a large model costs more memory than it saves time
    count = num_amx = 0
    for module in modules:
        module.packed_weight = pack_weight(module.weight, kind)
        count += 1
        num_amx += module.packed_weight.amx is not None
    logger.info("packed %d bf16 linear weights (%d for AMX tiles, FORNAX_CPU_LINEAR=%s) in "
                "%.2f s", count, num_amx, kind, time.perf_counter() - start)
    return count


def unpack_linear_weights(model: nn.Module) -> None:
    """Drop the packed copies (sleep level 2 frees the weights; wake-up packs again)."""
    for module in model.modules():
        if _has_pack_slot(module):
            module.packed_weight = None
