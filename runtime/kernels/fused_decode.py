"""The decoder layer stack of a CPU step of decodes and small prompt chunks in one C call (engine
core), via csrc/decode_layers_cpu.c."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from fornax.runtime import env
from fornax.runtime.kernels.build import load_decode_layers

logger = logging.getLogger(__name__)

_SEGMENTS = 3  # decode_layers_cpu.c: SEGS, row segments of different kinds in one weight
_WEIGHT_FIELDS = _SEGMENTS + 2  # W_N: the segments' descriptors, the bias, a dense weight
_LAYER_FIELDS = 4 * _WEIGHT_FIELDS + 5  # L_N int64 per layer
_SHAPE_FIELDS = 8  # S_N
_SHAPE_BLOCK = 6  # S_BLOCK: the KV block size
_CACHE = _LAYER_FIELDS - 1  # L_CACHE: the layer's KV cache address
# Dense weights without an AMX pack to share get a copy in the tile layout; beyond this many
# bytes of them (a second copy of a large model costs more memory than the call saves time, as
# packing.py's limit for its second pack) the stack keeps the per-op path.
_COPY_MAX_BYTES = 2 << 30


class FusedDecode:
    """A decoder's layers as one plan for fornax_decode_layers: per layer the addresses of its
    norm weights, quantized weight descriptors or dense bf16 weights in the tile layout, biases
    and KV cache (refreshed when the caches move). Built by `enable_fused_decode` once the
    weights are in their kernel layout."""

    def __init__(self, lib: Any, decoder: Any, plan: torch.Tensor, keep: list[torch.Tensor],
                 shape: torch.Tensor, eps: float, scale: float, rotary: Any,
                 max_rows: int, prompt_rows: bool) -> None:
        self._lib = lib
        self._decoder = decoder
        self._first = decoder.layers[0].self_attn.qkv_proj.packed_weight  # still loaded?
        self._plan, self._keep, self._shape = plan, keep, shape
        self._eps, self._scale, self._rotary = eps, scale, rotary
        self._max_rows = max_rows
        self._caches: tuple[int, ...] = ()
        self._blocks = 0  # blocks in each layer's KV cache (set with the caches)
        self._block_size = int(shape[_SHAPE_BLOCK])
        self._prompt_rows = prompt_rows  # steps with prompt chunks too (else decodes only)

    @property
    def max_rows(self) -> int:
        """The most tokens a step may have for the one call."""
        return self._max_rows

    @property
    def prompt_rows(self) -> bool:
        """Whether steps with prompt chunks beside the decodes take the call too."""
        return self._prompt_rows

    def covers(self, x: torch.Tensor, metadata: Any) -> bool:
        """bf16, few enough tokens for the decode kernel (more rows take the per-op path, whose
        matmuls switch to dense tiles): a step of single-token requests, or a small mixed step
        whose every token has its own decode row (cpu_paged's token rows: a prompt chunk's
        tokens attend causally over the cache, which holds the chunk's K/V before attention)."""
        rows = _kernel_rows(metadata)
        if rows is not None and not metadata.all_decode and (
                not self._prompt_rows or getattr(metadata, "prefill_q_starts", None) is None):
            return False  # the per-op path attends these prompt rows with another kernel
        return (rows is not None and x.dtype is torch.bfloat16 and x.dim() == 2
                and 0 < x.shape[0] == len(rows[1]) <= self._max_rows
                and self._decoder.layers[0].self_attn.qkv_proj.packed_weight is self._first)

    def run(self, x: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
            metadata: Any) -> torch.Tensor:
        """x [T, hidden] (the embeddings) -> the last layer's output, before the final norm."""
        caches = tuple(c.data_ptr() for c in kv_caches)
        if caches != self._caches:
            if any(c.dtype is not torch.bfloat16 or not c.is_contiguous() for c in kv_caches):
                raise RuntimeError("fused decode needs contiguous bf16 KV caches")
            self._plan[:, _CACHE] = torch.tensor(caches, dtype=torch.int64)
            self._caches, self._blocks = caches, min(c.shape[0] for c in kv_caches)
        x = x.contiguous()
        rows = x.shape[0]
        pos = positions[:rows]
        if pos.dtype is not torch.int64 or not pos.is_contiguous():
            pos = pos.to(torch.int64).contiguous()
        k_rows = metadata.k_slots
        if k_rows.dtype is not torch.int64 or not k_rows.is_contiguous():
            k_rows = k_rows.to(torch.int64).contiguous()
        rows_of = _kernel_rows(metadata)
        assert rows_of is not None  # covers() said so
        table, seq_lens = rows_of
        problem = _rows_problem(rows, table, seq_lens, self._block_size, self._blocks, pos,
                                k_rows)
        if problem:  # the kernel reads the table, the caches and these on trust
            raise RuntimeError(f"fused decode: {problem}")
        starts, lens = self._prompt_chunks(metadata)
        status = self._lib.fornax_decode_layers(
            self._plan.data_ptr(), self._plan.shape[0], self._shape.data_ptr(), self._eps,
            self._scale, x.data_ptr(), rows, pos.data_ptr(), k_rows.data_ptr(), table.ctypes.data,
            table.shape[1], seq_lens.ctypes.data, len(starts), starts.ctypes.data,
            lens.ctypes.data, self._rotary.cos_cache.data_ptr(),
            self._rotary.sin_cache.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"the fused decode kernel failed (status {status}) for {rows} rows")
        return x


    def _prompt_chunks(self, metadata: Any) -> tuple[np.ndarray, np.ndarray]:
        """The step's prompt chunks (first row, rows) that the per-op path gives its prefill
        kernel: the call attends their rows with the same kernel, so a prompt token rounds
        alike in both paths, whether prefilled whole or in chunks beside decodes."""
        starts = getattr(metadata, "prefill_q_starts", None)
        lens = getattr(metadata, "prefill_q_lens", None)
        if metadata.all_decode:
            return _NO_CHUNKS
        if (starts is None or lens is None or starts.dtype != np.int32 or lens.dtype != np.int32
                or starts.shape != lens.shape or not starts.flags.c_contiguous
                or not lens.flags.c_contiguous):
            raise RuntimeError("fused decode: prompt chunks without int32 starts and lengths")
        return starts, lens


_NO_CHUNKS = (np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32))


def _rows_problem(rows: int, table: Any, seq_lens: Any, block_size: int, blocks: int,
                  positions: torch.Tensor, k_rows: torch.Tensor) -> str:
    """Why a step's rows do not fit what the kernel reads ('' when they do): one C-contiguous
    int32 block-table row and context length per token, contexts of 1 up to the table's width
    in blocks that are in the cache, a position and a K row per token. Once per step."""
    if (table.dtype != np.int32 or seq_lens.dtype != np.int32 or table.ndim != 2
            or not table.flags.c_contiguous or not seq_lens.flags.c_contiguous
            or table.shape[0] != rows or seq_lens.shape != (rows,)):
        return f"block table {table.dtype} {table.shape} / context lengths for {rows} rows"
    if positions.numel() < rows or k_rows.numel() < rows:
        return f"{positions.numel()} positions and {k_rows.numel()} K rows for {rows} rows"
    longest, shortest = int(seq_lens.max()), int(seq_lens.min())
    if shortest < 1 or longest > table.shape[1] * block_size:
        return f"contexts of {shortest} to {longest} over {table.shape[1]} blocks of {block_size}"
    used = table[:, :-(-longest // block_size)]
    if int(used.min()) < 0 or int(used.max()) >= blocks:  # then exactly: each row's own blocks
        live = np.arange(used.shape[1]) < (seq_lens[:, None] + block_size - 1) // block_size
        ids = used[live]
        if int(ids.min()) < 0 or int(ids.max()) >= blocks:
            return f"a block outside the cache's {blocks}"
    return ""


def _kernel_rows(metadata: Any) -> tuple[Any, Any] | None:
    """(block table, context lengths) with one row per token of the step, or None."""
    if getattr(metadata, "all_decode", False):
        table, seq_lens = metadata.decode_block_table, metadata.decode_seq_lens
    else:
        table = getattr(metadata, "token_block_table", None)
        seq_lens = getattr(metadata, "token_seq_lens", None)
    return None if table is None or seq_lens is None else (table, seq_lens)


def _bf16_ptr(t: torch.Tensor | None) -> int | None:
    """t's address when it is a contiguous bf16 tensor, 0 for None, else None (not covered)."""
    if t is None:
        return 0
    return t.data_ptr() if t.dtype is torch.bfloat16 and t.is_contiguous() else None


def _dense_fields(linear: Any, keep: list[torch.Tensor], packs: list[torch.Tensor]
                  ) -> list[int] | str:
    """A dense bf16 weight's fields: its tile-layout pack (amx_linear's, shared with the per-op
    path where the CPU has AMX, else a copy made here and counted in `packs`)."""
    from fornax.runtime.kernels.amx_linear import pack_for_amx

    packed = linear.packed_weight
    tiles = None if packed is None else packed.amx
    weight = linear.weight
    if tiles is None:
        if weight.dtype is not torch.bfloat16 or weight.dim() != 2 or not weight.numel():
            return "a dense weight that is not bf16 (or not loaded)"
        tiles = pack_for_amx(weight)
        if tiles is None:
            return "a dense weight whose inputs are not a multiple of 32"
        packs.append(tiles)
    keep.append(tiles)
    return [0] * _SEGMENTS + [0, tiles.data_ptr()]  # the bias is set by the caller


def _weight_fields(linear: Any, keep: list[torch.Tensor], packs: list[torch.Tensor]
                   ) -> list[int] | str:
    """One linear layer's W_N fields (decode_layers_cpu.c), or why the kernel does not cover it."""
    from fornax.runtime.kernels.quant_format import QuantWeight
    from fornax.runtime.kernels.quant_linear import kernel_descriptor

    bias = _bf16_ptr(linear.bias)
    if bias is None:
        return "a bias that is not bf16"
    packed = linear.packed_weight
    quant = None if packed is None else packed.quant
    if quant is None:
        fields = _dense_fields(linear, keep, packs)
        return fields if isinstance(fields, str) else fields[:_SEGMENTS] + [bias, fields[-1]]
    listed = quant if isinstance(quant, list) else [quant]
    parts = [part for part in listed if isinstance(part, QuantWeight)]
    if not parts or len(parts) != len(listed):
        return "weights of a kind the kernel does not take"
    if len(parts) > _SEGMENTS or (len(parts) > 1 and linear.bias is not None):
        # the per-op path adds the bias after joining the segments (rounded twice)
        return "a weight of more kinds than the kernel joins, or joined with a bias"
    descs = [kernel_descriptor(part) for part in parts]
    if any(d is None or part.layout != "panel16" for d, part in zip(descs, parts)):
        return "a quantized weight outside the kernel's layout"
    keep += [d for d in descs if d is not None]
    return [d.data_ptr() for d in descs if d is not None] + [0] * (_SEGMENTS - len(parts)) + [
        bias, 0]


def _plan_layer(layer: Any, keep: list[torch.Tensor], packs: list[torch.Tensor]
                ) -> list[int] | str:
    """The layer's row of the plan, or why the kernel does not cover it."""
    attn, mlp = layer.self_attn, layer.mlp
    head_norms = [0, 0]
    if getattr(attn, "qk_norm", False):
        norms = (attn.q_norm, attn.k_norm)
        ptrs = [_bf16_ptr(n.weight) for n in norms]
        if any(not p or n.weight.numel() != attn.head_dim for p, n in zip(ptrs, norms)):
            return "a q/k norm weight that is not bf16"
        if any(n.eps != layer.input_layernorm.eps for n in norms):
            return "q/k norms of another eps"
        head_norms = [p or 0 for p in ptrs]
    row: list[int] = []
    for norm, linears in ((layer.input_layernorm, (attn.qkv_proj, attn.o_proj)),
                          (layer.post_attention_layernorm, (mlp.gate_up_proj, mlp.down_proj))):
        weight = _bf16_ptr(norm.weight)
        if not weight:
            return "a norm weight that is not bf16"
        row.append(weight)
        for linear in linears:
            fields = _weight_fields(linear, keep, packs)
            if isinstance(fields, str):
                return fields
            row += fields
            if linear is attn.qkv_proj:
                row += head_norms  # L_QNORM, L_KNORM
    # L_NORM1, q|k|v, q/k norms, o, L_NORM2, gate|up, down (W_N fields each), L_CACHE (per step)
    return row + [0]


def _linears(layers: list[Any]) -> list[Any]:
    """Every layer's q|k|v, o, gate|up and down."""
    return [lin for layer in layers for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                layer.mlp.gate_up_proj, layer.mlp.down_proj)]


def _dense_engine(layers: list[Any], packs: list[torch.Tensor], max_rows: int
                  ) -> tuple[int, int]:
    """(1 when the dense weights run on the AMX tiles, the most rows a call takes). AMX where the
    per-op path multiplies on the tiles too (its packs are shared: no `packs` made here), so
    both give the same values; then up to amx_linear's row limit where the per-op path switches
    to oneDNN above it."""
    from fornax.runtime.kernels.amx_linear import AMX_MAX_ROWS, amx_supported

    linears = [lin for lin in _linears(layers)
               if lin.packed_weight is not None and lin.packed_weight.quant is None]
    if not linears or packs or not amx_supported():
        return 0, max_rows
    if any(lin.packed_weight.onednn is not None for lin in linears):
        max_rows = min(max_rows, AMX_MAX_ROWS)
    return 1, max_rows


def enable_fused_decode(model: nn.Module, backend: Any) -> bool:
    """Give a Llama-family decoder (model.model.fused_decode) its one-call decode plan where the
    kernel covers it: CPU, bf16 activations, the cpu_paged attention backend; each weight either
    kept quantized (GGUF; up to three kinds in one fused weight, without a bias then) or dense
    bf16 (safetensors, FORNAX_GGUF_DEQUANTIZE=1) with inputs a multiple of 32; q/k/v biases and
    Qwen3's per-head q/k norm. FORNAX_FUSED_DECODE=0 turns it off. Returns whether it is on."""
    decoder: Any = getattr(model, "model", None)
    if decoder is None or not hasattr(decoder, "fused_decode"):
        return False
    decoder.fused_decode = None
    if not env.FUSED_DECODE.get():
        logger.info("fused decode off (FORNAX_FUSED_DECODE=0)")
        return False
    from fornax.runtime.attention.cpu_paged import CpuPagedBackend
    from fornax.runtime.kernels.quant_linear import DENSE_MIN_ROWS

    if not isinstance(backend, CpuPagedBackend) or backend.dtype is not torch.bfloat16:
        return False
    lib = load_decode_layers()
    if lib is None or lib.fornax_decode_layers_fields() != _LAYER_FIELDS * 100 + _SHAPE_FIELDS:
        return False
    layers = list(decoder.layers)
    copy_bytes = sum(lin.weight.numel() * 2 for lin in _linears(layers)
                     if lin.packed_weight is None or (lin.packed_weight.quant is None
                                                      and lin.packed_weight.amx is None))
    if copy_bytes > _COPY_MAX_BYTES:
        logger.info("fused decode off: its copy of the dense weights would take %.1f GiB",
                    copy_bytes / 2**30)
        return False
    rotary = layers[0].self_attn.rotary
    eps = layers[0].input_layernorm.eps
    keep: list[torch.Tensor] = []
    packs: list[torch.Tensor] = []  # dense weights packed here (no AMX pack to share)
    rows: list[list[int]] = []
    for layer in layers:
        row = _plan_layer(layer, keep, packs)
        if isinstance(row, str) or layer.self_attn.rotary is not rotary or any(
                n.eps != eps for n in (layer.input_layernorm, layer.post_attention_layernorm)):
            logger.info("fused decode off: %s", row if isinstance(row, str) else "layers differ")
            return False
        rows.append(row)
    if rotary.cos_cache.dtype is not torch.float32 or not rotary.cos_cache.is_contiguous():
        return False
    spec: Any = getattr(model, "spec")
    amx, max_rows = _dense_engine(layers, packs, DENSE_MIN_ROWS - 1)
    shape = torch.tensor([spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                          spec.intermediate_size, rotary.rotary_dim, backend.block_size, amx],
                         dtype=torch.int64)
    plan = torch.tensor(rows, dtype=torch.int64)
    # prompt rows only where the call attends them as the per-op path does (its prefill kernel:
    # bf16, head_dim a multiple of 32, AVX512-BF16), so a prompt token rounds alike either way
    prompt_rows = bool(lib.fornax_decode_layers_prompt_rows()) and backend.has_prefill_kernel
    decoder.fused_decode = FusedDecode(lib, decoder, plan, keep, shape, float(eps),
                                       float(backend.scale), rotary, max_rows, prompt_rows)
    logger.info("fused decode on: %d layers in one C call per step of decodes%s (up to %d rows%s)",
                len(rows), " and prompt chunks" if prompt_rows else "", max_rows,
                ", dense weights on AMX tiles" if amx else "")
    if packs:
        logger.info("fused decode packed %d dense weights in the tile layout (%.1f MiB beside "
                    "the per-op path's pack)", len(packs),
                    sum(t.numel() * t.element_size() for t in packs) / 2**20)
    return True


def disable_fused_decode(model: nn.Module) -> None:
    """Drop the plan (the weights it points at are being released)."""
    decoder = getattr(model, "model", None)
    if decoder is not None and getattr(decoder, "fused_decode", None) is not None:
        decoder.fused_decode = None
