"""Weight-only quantized linear layers and embeddings on CPU (engine-core process), via csrc/quant_linear_cpu.c."""

from __future__ import annotations

import copy
import ctypes
import logging
import threading
from functools import cache

import torch
import torch.nn.functional as F

from fornax.runtime.kernels.build import load_amx_linear, load_quant_linear
from fornax.runtime.kernels.quant_format import (
    PANEL,
    QuantWeight,
    dequantize,
    prepare_for_kernel,
    row_major,
    take_rows,
)

logger = logging.getLogger(__name__)

ISA_NAMES = {0: "c", 2: "avx512-vnni"}
# From this many activation rows on (prefill chunks), on a CPU with AMX and bf16 activations, the
# weight is dequantized chunk by chunk straight into the AMX tile layout and multiplied there
# (about the bf16 packed path's speed plus ~0.1 ns per weight); on a CPU whose kernel is the plain
# C loop, dequantized for torch's matmul; elsewhere (AVX512-VNNI without AMX: an int8 dot product
# has twice the lanes of a bf16 one; not yet measured there) the kernel runs at every row count. Measured on the 2-core Xeon (AMX),
# one thread, CPU time, q4, kernel vs AMX path, ms: 3072x576 at 32 rows 0.50 vs 0.53, at 40 rows
# 0.61 vs 0.59; 576x1536 at 32 rows 0.27 vs 0.24, at 40 rows 0.33 vs 0.33; 576x576 at 40 rows
# 0.145 vs 0.125 (perf/README.md, "Quantized linear layers").
DENSE_MIN_ROWS = 40
DENSE_CHUNK = 1 << 20  # weight elements dequantized per matmul on that path (2 MiB of bf16)
AMX_CHUNK = 1 << 18  # weight elements dequantized per AMX call (512 KiB of bf16, stays in L2)


@cache
def _kernel() -> tuple[ctypes.CDLL, int] | None:
    """The built kernel and its ISA code, or None (FORNAX_NATIVE_KERNELS=0, no compiler, or a
    CPU with neither path worth calling)."""
    lib = load_quant_linear()
    if lib is None:
        return None
    isa = int(lib.fornax_quant_linear_isa())
    logger.info("quantized linear kernel: %s", ISA_NAMES.get(isa, str(isa)))
    return lib, isa


@cache
def _amx() -> bool:
    from fornax.runtime.kernels.amx_linear import amx_supported

    return amx_supported()


def quant_isa() -> str:
    """Which path quant_linear takes at batch 1: 'avx512-vnni', 'c' or 'torch' (dequantize)."""
    kernel = _kernel()
    return "torch" if kernel is None else ISA_NAMES.get(kernel[1], "c")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


_prepare_lock = threading.Lock()


def prepare_in_place(qw: QuantWeight) -> QuantWeight:
    """qw itself, turned into the kernel's panel16 layout in place where the native kernel is
    available (its tensors replaced, so no row-major copy stays; once, thread-safe), else left
    row-major. quant_linear and quant_embedding call it on first use; a loader calls it after
    its last row operation (take_rows, concat_rows) and cache write, to pay the cost at load."""
    if qw.layout == "rows" and _kernel() is not None:
        with _prepare_lock:
            if qw.layout == "rows":
                prepared = prepare_for_kernel(qw)
                qw.data, qw.scales, qw.mins = prepared.data, prepared.scales, prepared.mins
                qw.layout = prepared.layout  # last: a reader seeing it sees the new tensors
    return qw


def _snapshot(qw: QuantWeight) -> QuantWeight:
    """A consistent view of qw while another thread may be preparing it in place."""
    if qw.layout == "rows":
        with _prepare_lock:
            return copy.copy(qw)
    return qw


def linear_reference(x: torch.Tensor, qw: QuantWeight,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The portable path: F.linear over the dequantized weight (no native kernel needed)."""
    weight = dequantize(_snapshot(qw), torch.float32).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


_scratch = threading.local()  # per calling thread: the dense weight chunk of the last call


def _dense_linear(lib: ctypes.CDLL, x: torch.Tensor, qw: QuantWeight,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T (+ b) through torch's matmul, W dequantized DENSE_CHUNK elements at a time into
    a buffer this thread reuses (no page faults on a fresh multi-MB tensor per call; the chunk
    is still in cache when the matmul reads it)."""
    n, k, dtype = qw.out_features, qw.in_features, x.dtype
    step = max(1, DENSE_CHUNK // k // PANEL) * PANEL  # whole panels per chunk
    key = f"buf_{dtype}"
    buf = getattr(_scratch, key, None)
    if buf is None or buf.numel() < min(step, n) * k:
        buf = torch.empty(min(step, n) * k, dtype=dtype)
        setattr(_scratch, key, buf)
    bias = None if bias is None else bias.to(dtype)
    parts = []
    for r0 in range(0, n, step):
        rows = min(step, n - r0)
        chunk = buf[:rows * k].view(rows, k)
        _dequantize_rows(lib, qw, None, r0, rows, chunk)
        parts.append(F.linear(x, chunk, None if bias is None else bias[r0:r0 + rows]))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _amx_dense_linear(lib: ctypes.CDLL, desc: torch.Tensor, x: torch.Tensor, qw: QuantWeight,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """bf16 x @ W^T (+ b) on AMX tiles: AMX_CHUNK weight elements at a time dequantized straight
    into amx_linear's packed tile layout (a buffer this thread reuses), each chunk's output
    columns written in place by fornax_amx_linear_bf16."""
    amx = load_amx_linear()
    assert amx is not None
    n, k, threads = qw.out_features, qw.in_features, torch.get_num_threads()
    flat = x.reshape(-1, k)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    rows, panels = flat.shape[0], -(-n // PANEL)
    step = max(1, AMX_CHUNK // (2 * PANEL * k)) * 2  # whole 32-column AMX units
    buf = getattr(_scratch, "amx", None)
    if buf is None or buf.numel() < step * PANEL * k:
        buf = torch.empty(step * PANEL * k, dtype=torch.bfloat16)
        _scratch.amx = buf
    out = torch.empty((rows, n), dtype=torch.bfloat16)
    b16 = None if bias is None else bias.to(torch.bfloat16).contiguous()
    for p0 in range(0, panels, step):
        count, c0 = min(step, panels - p0), p0 * PANEL
        if lib.fornax_quant_to_amx(desc.data_ptr(), p0, count, buf.data_ptr(), threads) != 0:
            raise RuntimeError("fornax_quant_to_amx refused the weight")
        status = amx.fornax_amx_linear_bf16(
            flat.data_ptr(), flat.stride(0), buf.data_ptr(),
            None if b16 is None else b16.data_ptr() + 2 * c0, out.data_ptr() + 2 * c0, n, rows,
            min(count * PANEL, n - c0), k, threads)
        if status != 0:
            raise RuntimeError(f"the AMX linear kernel refused {rows} x {k} x {n}")
    return out if x.dim() == 2 else out.view(*x.shape[:-1], n)


def _dequantize_rows(lib: ctypes.CDLL, qw: QuantWeight, ids: torch.Tensor | None, row0: int,
                     rows: int, out: torch.Tensor) -> None:
    """Rows ids (or row0 .. row0 + rows - 1) of qw, dense, into out (bf16 or float32)."""
    status = lib.fornax_quant_dequantize(
        qw.data.data_ptr(), qw.scales.data_ptr(), _ptr(qw.mins), qw.kind == "q4", qw.group,
        qw.in_features, int(qw.layout == "panel16"), _ptr(ids), row0, rows, out.data_ptr(),
        out.dtype == torch.bfloat16, torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"quantized dequantize of {rows} rows failed (status {status})")


def _descriptor(qw: QuantWeight) -> torch.Tensor | None:
    """qw's int64 descriptor for the kernel (built once per weight and kept on it; the caller
    holds the returned tensor while the kernel reads it, even if another thread replaces the
    cached one), or None when its tensors are not in the kernel's layout (float16 scales,
    contiguous)."""
    cached = qw.__dict__.get("_kernel_descriptor")
    if cached is not None and cached[0] is qw.data and cached[1] is qw.scales \
            and cached[2] is qw.mins:
        return cached[3]
    tensors = [qw.data, qw.scales] + ([] if qw.mins is None else [qw.mins])
    if qw.scales.dtype != torch.float16 or (qw.mins is not None and qw.mins.dtype != torch.float16) \
            or not all(t.is_contiguous() and t.device.type == "cpu" for t in tensors):
        return None
    desc = torch.tensor([qw.data.data_ptr(), qw.scales.data_ptr(),
                         0 if qw.mins is None else qw.mins.data_ptr(), int(qw.kind == "q4"),
                         qw.group, qw.out_features, qw.in_features,
                         int(qw.layout == "panel16")], dtype=torch.int64)
    qw.__dict__["_kernel_descriptor"] = (qw.data, qw.scales, qw.mins, desc)
    return desc


def kernel_descriptor(qw: QuantWeight) -> torch.Tensor | None:
    """qw prepared for the kernel and its descriptor (decode_layers_cpu.c reads it too), or None
    when the native kernel is not built or qw is outside its layout."""
    return None if _kernel() is None else _descriptor(prepare_in_place(qw))


def quant_linear(x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None, *,
                 isa: str | None = None) -> torch.Tensor:
    """x [..., K] (bf16 or float32) @ dequantize(qw)^T (+ bias) -> [..., N] in x.dtype.

    The kernel quantizes each activation row to int8 per weight group (the only error against
    the dense reference: at most amax_group / 254 per activation element); from DENSE_MIN_ROWS
    rows on the weight is dequantized for AMX tiles (bf16 x) or torch's matmul instead (see
    DENSE_MIN_ROWS). A row-major qw is prepared in place on first use (prepare_in_place). `isa` forces a path (tests,
    benchmarks): 'kernel' (the native kernel at any row count), 'c' (its plain C loop), 'torch'
    (linear_reference), None (the fastest here). Thread-safe; allocates only the output at
    decode sizes.
    """
    if isa not in (None, "kernel", "c", "torch"):
        raise ValueError(f"quant_linear: isa {isa!r} is not kernel, c or torch")
    kernel = _kernel()
    dtype = x.dtype
    desc = None if kernel is None or isa == "torch" else _descriptor(prepare_in_place(qw))
    if desc is None or (dtype is not torch.bfloat16 and dtype is not torch.float32):
        return linear_reference(x, qw, bias)
    assert kernel is not None
    k, n = qw.in_features, qw.out_features
    if x.shape[-1] != k:
        raise ValueError(f"quant_linear: x has {x.shape[-1]} features, the weight {k}")
    if bias is not None and bias.numel() != n:  # the kernels read n values of it
        raise ValueError(f"quant_linear: a bias of {bias.numel()} values for {n} outputs")
    flat = x if x.dim() == 2 else x.reshape(-1, k)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    rows = flat.shape[0]
    if isa is None and rows >= DENSE_MIN_ROWS:
        if dtype is torch.bfloat16 and _amx():
            return _amx_dense_linear(kernel[0], desc, x, qw, bias)
        if kernel[1] == 0:  # the plain C loop: oneDNN's matmul over dequantized chunks is faster
            return _dense_linear(kernel[0], x, qw, bias)
    if rows == 0:
        return _dense_linear(kernel[0], x, qw, bias)
    flags = int(dtype is torch.bfloat16) | ((0 if isa == "c" else kernel[1]) << 2)
    if bias is not None:
        if bias.dtype is torch.bfloat16:
            flags |= 2
        elif bias.dtype is not torch.float32:
            bias = bias.float()
        if not bias.is_contiguous():
            bias = bias.contiguous()
    out = torch.empty((rows, n), dtype=dtype)
    status = kernel[0].fornax_quant_linear(
        desc.data_ptr(), flat.data_ptr(), flat.stride(0), rows,
        None if bias is None else bias.data_ptr(), out.data_ptr(), flags, torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"quantized linear kernel refused {qw.kind}/{qw.group} shape "
                           f"{tuple(flat.shape)} x {n} (status {status})")
    return out if x.dim() == 2 else out.view(*x.shape[:-1], n)


def quant_embedding(qw: QuantWeight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of the dequantized table as dtype, shape [*ids.shape, K] (only those rows are
    dequantized)."""
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= qw.out_features):
        raise IndexError(f"embedding ids outside [0, {qw.out_features})")
    kernel = _kernel()
    if kernel is None or dtype not in (torch.bfloat16, torch.float32) \
            or _descriptor(prepare_in_place(qw)) is None:
        rows = take_rows(row_major(_snapshot(qw)), flat)
        return dequantize(rows, torch.float32).to(dtype).view(*ids.shape, qw.in_features)
    out = torch.empty((flat.numel(), qw.in_features), dtype=dtype)
    _dequantize_rows(kernel[0], qw, flat, 0, flat.numel(), out)
    return out.view(*ids.shape, qw.in_features)
