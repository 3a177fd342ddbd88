"""bf16 linear layers on Intel AMX tiles for decode-sized batches, via csrc/amx_linear_cpu.c."""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

import torch

from fornax.runtime.kernels.build import load_amx_linear

logger = logging.getLogger(__name__)

AMX_MAX_ROWS = 32  # up to here the AMX kernel beats oneDNN (perf/README.md, "CPU linear layers")
UNIT_COLUMNS = 32  # output columns per packed unit (two 16-column tiles)
K_BLOCK = 32  # input features per tile row pass


def _cpu_has_amx() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags and " amx_tile" in flags


@cache
def amx_supported() -> bool:
    """The CPU has AMX-BF16, the kernel built, and Linux granted this process the tile state."""
    if not _cpu_has_amx():
        return False
    lib = load_amx_linear()
    if lib is None:
        return False
    if lib.fornax_amx_init() != 0:
        logger.warning("the kernel refused AMX tile state (arch_prctl): using oneDNN linears")
        return False
    return True


def pack_for_amx(weight: torch.Tensor) -> torch.Tensor | None:
    """W [N, K] bf16 -> the kernel's tile layout (N padded to 32), or None when K % 32 != 0.

    Layout [unit][k_block][half][k_pair][column][k % 2]: each unit of 32 output columns is one
    contiguous run, each (k_block, half) a 1 KiB B tile in the VNNI pairing TDPBF16PS reads.
    """
    n, k = weight.shape
    if k % K_BLOCK or weight.dtype != torch.bfloat16:
        return None
    units = -(-n // UNIT_COLUMNS)
    padded = torch.zeros(units * UNIT_COLUMNS, k, dtype=torch.bfloat16)
    padded[:n] = weight.detach()
    tiles = padded.view(units, 2, 16, k // K_BLOCK, K_BLOCK // 2, 2)
    return tiles.permute(0, 3, 1, 4, 2, 5).contiguous()


def amx_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
               out_features: int) -> torch.Tensor:
    """x @ W^T (+ b) for bf16 x [..., K] with W from `pack_for_amx`; fp32 accumulation."""
    k = x.shape[-1]
    if packed.numel() != -(-out_features // UNIT_COLUMNS) * UNIT_COLUMNS * k or (
            bias is not None and bias.numel() != out_features):  # the kernel reads them whole
        raise ValueError(f"amx_linear: x of {k} features, {out_features} outputs, a packed "
                         f"weight of {packed.numel()} values"
                         + ("" if bias is None else f" and a bias of {bias.numel()}"))
    two_d = x.dim() == 2  # the decoder's [tokens, features]: no reshape or view to dispatch
    flat = x if two_d else x.reshape(-1, k)
    if flat.stride(-1) != 1 or flat.dtype != torch.bfloat16:
        flat = flat.contiguous().to(torch.bfloat16)
    out = torch.empty((flat.shape[0], out_features), dtype=torch.bfloat16)
    if bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous()):
        bias = bias.to(torch.bfloat16).contiguous()
    lib = load_amx_linear()
    if lib is None:  # callers checked amx_supported(); a packed weight implies the kernel built
        raise RuntimeError("the AMX linear kernel is not built")
    status = lib.fornax_amx_linear_bf16(
        flat.data_ptr(), flat.stride(0), packed.data_ptr(),
        bias.data_ptr() if bias is not None else None, out.data_ptr(), out.stride(0),
        flat.shape[0], out_features, k, torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"the AMX linear kernel refused shape {tuple(flat.shape)} x "
                           f"{out_features}")
    return out if two_d else out.view(*x.shape[:-1], out_features)
