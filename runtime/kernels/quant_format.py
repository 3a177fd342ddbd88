"""GGUF quantized weights repacked into fornax's row-major q4/q8 layout (engine-core process, at load)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import gguf
import numpy as np
import torch

logger = logging.getLogger(__name__)

# Layout (what the C kernel in csrc/quant_linear_cpu.c reads):
#   q4: data uint8 [N, K//2]; the 32 elements of group g of a row live in bytes 16g..16g+15 of
#       that row, element j (j < 16) in the low nibble of byte 16g+j and element j+16 in its high
#       nibble (ggml's Q4_0/Q4_1 order). w = scale * q + min, q in 0..15.
#   q8: data int8 [N, K]; w = scale * q; group 32 (Q8_0) or 16 (Q6_K).
# scales and mins are float16 [N, K//group]. Q8_0, Q4_0 and Q4_1 repack losslessly (their scales
# are float16 in the file, -8*d is exact); Q4_K's d*sc, dmin*m and Q6_K's d*sc are products of a
# float16 and a 6- or 8-bit integer, rounded to float16 here (relative error <= 2**-11 per scale,
# far below the 4/6-bit quantization step itself).
#
# prepare_for_kernel turns that into the "panel16" layout the linear kernel streams, once, after
# every row operation (take_rows, concat_rows; the cache on disk stays row-major): rows padded
# to a multiple of 16 with zeros; in each panel of 16 rows, the 4-byte words of the rows
# interleaved (word w of row r at bytes 64w + 4r of the panel: one 64-byte vector holds a word of
# every row); q8 bytes stored + 128 (as uint8); scales and mins [panel][group][16 rows]. data
# keeps the shape [padded N, K//2 or K] and scales/mins [padded N, K//group]: same bytes per
# row, permuted within each panel.

KINDS = ("q4", "q8")
LAYOUTS = ("rows", "panel16")
PANEL = 16
_META_VERSION = 1
_T = gguf.GGMLQuantizationType
_QK_K = 256


@dataclass
class QuantWeight:
    """A linear (or embedding) weight [N, K] kept weight-only quantized, rows independent."""

    kind: str
    out_features: int
    in_features: int
    group: int
    data: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    source_type: str
    layout: str = "rows"  # or "panel16" (prepare_for_kernel), read by the linear kernel

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"QuantWeight kind must be one of {KINDS}, not {self.kind!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"QuantWeight layout must be one of {LAYOUTS}, not {self.layout!r}")
        n, k = self.stored_rows, self.in_features
        if self.group <= 0 or k % self.group:
            raise ValueError(f"in_features {k} is not a multiple of group {self.group}")
        width = k // 2 if self.kind == "q4" else k
        if tuple(self.data.shape) != (n, width):
            raise ValueError(f"{self.kind} data shape {tuple(self.data.shape)} != {(n, width)}")
        if tuple(self.scales.shape) != (n, k // self.group):
            raise ValueError(f"scales shape {tuple(self.scales.shape)} != {(n, k // self.group)}")
        if (self.mins is None) != (self.kind == "q8"):
            raise ValueError("q4 weights need mins; q8 weights have none")

    @property
    def stored_rows(self) -> int:
        """Rows the tensors hold: out_features, padded to a multiple of 16 in panel16."""
        n = self.out_features
        return n if self.layout == "rows" else -(-n // PANEL) * PANEL


def _f16(values: np.ndarray) -> np.ndarray | None:
    """values rounded to float16, or None when one of them does not fit (the loader keeps dense)."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = values.astype(np.float16)
    return out if np.isfinite(out).all() else None


def _blocks(raw: np.ndarray, tensor_type: _T, n: int, k: int) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[tensor_type]
    if k % block:
        raise ValueError(f"{tensor_type.name}: in_features {k} is not a multiple of {block}")
    flat = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if flat.size != n * (k // block) * size:
        raise ValueError(f"{tensor_type.name}: {flat.size} bytes for shape {(n, k)}")
    return flat.reshape(n, k // block, size)


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 stored at byte `start` of every block, as float32 [n, blocks]."""
    return np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16)[..., 0].astype(
        np.float32)


def _nibbles_to_q4(values: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 [n, groups, 32] -> packed bytes [n, groups * 16] in the q4 order."""
    packed = values[..., :16] | (values[..., 16:] << np.uint8(4))
    return packed.reshape(values.shape[0], -1)


def _q4(source: str, n: int, k: int, data: np.ndarray, scale: np.ndarray,
        minimum: np.ndarray) -> QuantWeight | None:
    s16, m16 = _f16(scale.reshape(n, -1)), _f16(minimum.reshape(n, -1))
    if s16 is None or m16 is None:
        return None
    return QuantWeight("q4", n, k, 32, torch.from_numpy(np.ascontiguousarray(data)),
                       torch.from_numpy(s16), torch.from_numpy(m16), source)


def _q8(source: str, n: int, k: int, group: int, data: np.ndarray,
        scale: np.ndarray) -> QuantWeight | None:
    s16 = _f16(scale.reshape(n, -1))
    if s16 is None:
        return None
    q = np.ascontiguousarray(data).view(np.int8).reshape(n, k)
    return QuantWeight("q8", n, k, group, torch.from_numpy(q), torch.from_numpy(s16), None,
                       source)


def _q4_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes of 6-bit scales and mins -> (sc, m), each uint8 [..., 8]."""
    lo, hi, mix = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
    m = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)], axis=-1)
    return sc, m


def repack_gguf(tensor_type: gguf.GGMLQuantizationType, raw: np.ndarray,
                shape: tuple[int, int]) -> QuantWeight | None:
    """The q4/q8 QuantWeight of a GGUF tensor's raw block bytes (shape = (N, K)), or None for a
    type this layout does not hold (the loader keeps that tensor dense)."""
    n, k = int(shape[0]), int(shape[1])
    name = _T(tensor_type).name
    if tensor_type == _T.Q8_0:
        b = _blocks(raw, tensor_type, n, k)
        return _q8(name, n, k, 32, b[..., 2:], _half(b, 0))
    if tensor_type == _T.Q4_0:
        b = _blocks(raw, tensor_type, n, k)
        d = _half(b, 0)
        return _q4(name, n, k, b[..., 2:].reshape(n, -1), d, -8.0 * d)
    if tensor_type == _T.Q4_1:
        b = _blocks(raw, tensor_type, n, k)
        return _q4(name, n, k, b[..., 4:].reshape(n, -1), _half(b, 0), _half(b, 2))
    if tensor_type == _T.Q4_K:
        b = _blocks(raw, tensor_type, n, k)
        d, dmin = _half(b, 0), _half(b, 2)
        sc, m = _q4_k_scales(b[..., 4:16])
        qs = b[..., 16:].reshape(n, -1, 4, 1, 32)  # [n, super, chunk of 64, 1, 32 bytes]
        q = (qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)) & np.uint8(0x0F)
        data = _nibbles_to_q4(q.reshape(n, -1, 32))  # groups: chunk 0 low, chunk 0 high, ...
        scale = d[..., None] * sc.astype(np.float32)
        minimum = -(dmin[..., None] * m.astype(np.float32))
        return _q4(name, n, k, data, scale, minimum)
    if tensor_type == _T.Q6_K:
        b = _blocks(raw, tensor_type, n, k)
        ql = b[..., :128].reshape(n, -1, 2, 1, 64)
        qh = b[..., 128:192].reshape(n, -1, 2, 1, 32)
        sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)
        d = _half(b, 208)
        low = (ql >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)) & np.uint8(0x0F)
        high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)) & np.uint8(3)
        q = (low.reshape(n, -1, 8, 32) | (high.reshape(n, -1, 8, 32) << np.uint8(4)))
        signed = (q.astype(np.int16) - 32).astype(np.int8)
        return _q8(name, n, k, 16, signed, d[..., None] * sc)
    return None


def prepare_for_kernel(qw: QuantWeight) -> QuantWeight:
    """qw in the panel16 layout the linear kernel reads (a new QuantWeight; qw itself when it is
    already there). Call it once, after every row operation."""
    if qw.layout == "panel16":
        return qw
    n = qw.out_features
    rows = -(-n // PANEL) * PANEL

    def panels(t: torch.Tensor) -> torch.Tensor:
        if rows > n:  # zero rows: zero scales and mins, outputs never stored
            t = torch.cat([t, t.new_zeros((rows - n, t.shape[1]))])
        width = t.shape[1]
        return t.reshape(rows // PANEL, PANEL, width).transpose(1, 2).contiguous().reshape(
            rows, width)

    data = qw.data.contiguous().view(torch.uint8)
    if qw.kind == "q8":
        data = data ^ 0x80
    words = panels(data.view(torch.int32)).view(torch.uint8)
    return QuantWeight(qw.kind, n, qw.in_features, qw.group, words, panels(qw.scales),
                       None if qw.mins is None else panels(qw.mins), qw.source_type, "panel16")


def row_major(qw: QuantWeight) -> QuantWeight:
    """qw in the row-major layout (a new QuantWeight for a panel16 one; qw itself otherwise)."""
    if qw.layout == "rows":
        return qw
    n, rows = qw.out_features, qw.stored_rows

    def unpanel(t: torch.Tensor) -> torch.Tensor:
        width = t.shape[1]
        return t.reshape(rows // PANEL, width, PANEL).transpose(1, 2).reshape(rows, width)[:n]

    data = unpanel(qw.data.view(torch.int32)).contiguous().view(torch.uint8)
    if qw.kind == "q8":
        data = (data ^ 0x80).view(torch.int8)
    return QuantWeight(qw.kind, n, qw.in_features, qw.group, data, unpanel(qw.scales).contiguous(),
                       None if qw.mins is None else unpanel(qw.mins).contiguous(), qw.source_type)


def _require_rows(qw: QuantWeight, what: str) -> None:
    if qw.layout != "rows":
        raise ValueError(f"{what} needs a row-major QuantWeight, not a {qw.layout} one: run row "
                         f"operations and write caches before prepare_for_kernel")


def dequantize(qw: QuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense [N, K] weight (the reference every kernel is tested against), either layout."""
    qw = row_major(qw)
    n, k, g = qw.out_features, qw.in_features, qw.group
    scales = qw.scales.float().unsqueeze(-1)
    if qw.kind == "q8":
        w = qw.data.reshape(n, k // g, g).float() * scales
    else:
        packed = qw.data.reshape(n, k // g, g // 2)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()
        assert qw.mins is not None
        w = q * scales + qw.mins.float().unsqueeze(-1)
    return w.reshape(n, k).to(dtype)


def take_rows(qw: QuantWeight, index: torch.Tensor | slice | Sequence[int]) -> QuantWeight:
    """Rows `index` of qw (a permutation, a slice, a selection), as a new QuantWeight."""
    _require_rows(qw, "take_rows")
    idx = index if isinstance(index, slice) else torch.as_tensor(index, dtype=torch.long)
    data = qw.data[idx].contiguous()
    return QuantWeight(qw.kind, data.shape[0], qw.in_features, qw.group, data,
                       qw.scales[idx].contiguous(),
                       None if qw.mins is None else qw.mins[idx].contiguous(), qw.source_type)


def concat_rows(parts: list[QuantWeight]) -> QuantWeight:
    """The parts' rows one after another (same kind, group and in_features, else ValueError)."""
    if not parts:
        raise ValueError("concat_rows needs at least one part")
    first = parts[0]
    for p in parts:
        _require_rows(p, "concat_rows")
    for p in parts[1:]:
        if (p.kind, p.group, p.in_features) != (first.kind, first.group, first.in_features):
            raise ValueError(f"cannot concatenate {p.kind}/{p.group}/K={p.in_features} rows to "
                             f"{first.kind}/{first.group}/K={first.in_features} rows")
    mins = None
    if first.mins is not None:
        mins = torch.cat([p.mins for p in parts if p.mins is not None])
    sources = sorted({p.source_type for p in parts})
    return QuantWeight(first.kind, sum(p.out_features for p in parts), first.in_features,
                       first.group, torch.cat([p.data for p in parts]),
                       torch.cat([p.scales for p in parts]), mins, "+".join(sources))


def to_tensors(qw: QuantWeight, prefix: str) -> dict[str, torch.Tensor]:
    """qw as plain tensors for a safetensors file: {prefix}.qdata/.qscales[/.qmins]/.qmeta/.qsource."""
    _require_rows(qw, "to_tensors")
    meta = torch.tensor([_META_VERSION, KINDS.index(qw.kind), qw.group, qw.out_features,
                         qw.in_features], dtype=torch.int64)
    out = {f"{prefix}.qdata": qw.data.contiguous(), f"{prefix}.qscales": qw.scales.contiguous(),
           f"{prefix}.qmeta": meta,
           f"{prefix}.qsource": torch.tensor(list(qw.source_type.encode()), dtype=torch.uint8)}
    if qw.mins is not None:
        out[f"{prefix}.qmins"] = qw.mins.contiguous()
    return out


def from_tensors(tensors: dict[str, torch.Tensor], prefix: str) -> QuantWeight | None:
    """The QuantWeight that to_tensors stored under prefix, or None when there is none."""
    meta = tensors.get(f"{prefix}.qmeta")
    if meta is None:
        return None
    version, kind, group, n, k = (int(v) for v in meta.tolist())
    if version != _META_VERSION:
        raise ValueError(f"{prefix}: quantized weight format {version}, expected {_META_VERSION}")
    source = tensors.get(f"{prefix}.qsource")
    return QuantWeight(KINDS[kind], n, k, group, tensors[f"{prefix}.qdata"],
                       tensors[f"{prefix}.qscales"], tensors.get(f"{prefix}.qmins"),
                       "" if source is None else bytes(source.tolist()).decode())


def nbytes(qw: QuantWeight) -> int:
    """Bytes qw holds in memory (data, scales and mins)."""
    total = qw.data.numel() * qw.data.element_size()
    total += qw.scales.numel() * qw.scales.element_size()
    if qw.mins is not None:
        total += qw.mins.numel() * qw.mins.element_size()
    return total
