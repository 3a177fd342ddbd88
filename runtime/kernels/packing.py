"""CPU linear weights in kernel layouts: bf16 pre-packed (oneDNN, AMX tiles), or GGUF-quantized."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, Union

import torch
from torch import nn

from fornax.runtime import env
from fornax.runtime.kernels.amx_linear import (
    AMX_MAX_ROWS,
    amx_linear,
    amx_supported,
    pack_for_amx,
)

if TYPE_CHECKING:
    from fornax.runtime.kernels.quant_format import QuantWeight

logger = logging.getLogger(__name__)

# A quantized weight: one QuantWeight, or row segments of different kinds one after another
# (a fused q|k|v of a Q4_K_M file: q and k Q4_K, v Q6_K), each writing its columns of the output
QuantRows = Union["QuantWeight", list["QuantWeight"]]
_quant_ops: Any = None  # runtime/kernels/quant_linear.py, imported with the first quantized weight

_BOTH_PACKS_MAX_BYTES = 2 << 30  # beyond this many bytes of linear weights, auto packs AMX only


@dataclass
class PackedWeight:
    """A linear layer's weight in the layouts its CPU kernels read."""

    out_features: int
    onednn: torch.Tensor | None = None
    amx: torch.Tensor | None = None
    quant: QuantRows | None = None  # GGUF weights kept quantized (quant_format.py)


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN packs bf16 weights on x86 CPUs; float32 packing is not reliably faster or equal."""
    return (device.type == "cpu" and dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def packed_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T (+ b) through the pack that suits the number of rows (same values as F.linear)."""
    if packed.quant is not None:
        return _quant_forward(x, packed.quant, bias)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if packed.amx is not None and (rows <= AMX_MAX_ROWS or packed.onednn is None):
        return amx_linear(x, packed.amx, bias, packed.out_features)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, packed.onednn, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], packed.out_features)


def _quant_forward(x: torch.Tensor, quant: QuantRows, bias: torch.Tensor | None
                   ) -> torch.Tensor:
    if not isinstance(quant, list):
        return _quant_ops.quant_linear(x, quant, bias)
    out = torch.cat([_quant_ops.quant_linear(x, part) for part in quant], dim=-1)
    return out if bias is None else out.add_(bias)


def quant_packed(parts: list[QuantWeight]) -> PackedWeight:
    """The pack of a quantized weight given as row segments in order: adjacent segments of the
    same kind and group are joined (`concat_rows`), so most fused weights are one QuantWeight."""
    from fornax.runtime.kernels.quant_format import concat_rows

    _import_quant_ops()
    runs: list[list[QuantWeight]] = []
    for part in parts:
        if runs and (runs[-1][0].kind, runs[-1][0].group) == (part.kind, part.group):
            runs[-1].append(part)
        else:
            runs.append([part])
    joined = [run[0] if len(run) == 1 else concat_rows(run) for run in runs]
    for qw in joined:  # the kernel's panel layout at load, not on the first forward
        _quant_ops.prepare_in_place(qw)
    total = sum(p.out_features for p in joined)
    return PackedWeight(total, quant=joined[0] if len(joined) == 1 else joined)


def quant_embedding(qw: QuantWeight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of a quantized embedding table, dequantized to `dtype`."""
    _import_quant_ops()
    return _quant_ops.quant_embedding(qw, ids, dtype)


def _import_quant_ops() -> None:
    global _quant_ops
    if _quant_ops is None:
        from fornax.runtime.kernels import quant_linear

        _quant_ops = quant_linear


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
    """Drop the packed copies and quantized weights (sleep level 2 frees the weights; wake-up
    loads and packs again)."""
    from fornax.runtime.kernels.fused_decode import disable_fused_decode

    disable_fused_decode(model)  # its plan points at the weights released here
    for module in model.modules():
        if _has_pack_slot(module):
            module.packed_weight = None
        if getattr(module, "quant_weight", None) is not None:
            setattr(module, "quant_weight", None)  # an embedding's quantized table
