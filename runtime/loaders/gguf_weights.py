"""GGUF tensors -> one safetensors file: float32, or quantized blocks kept (engine core, prepare)."""

from __future__ import annotations

import json
import os
import pathlib
import struct
import sys
from typing import IO, Any

import gguf
import numpy as np
import torch

from fornax.runtime.errors import ModelLoadError

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_T = gguf.GGMLQuantizationType
# Dense tensors of the quantized folder keep the file's own 16-bit type (the loader casts them)
_KEEP_16BIT = {_T.F16: "F16", _T.BF16: "BF16"}
_SAFETENSORS_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
                       torch.int32: "I32", torch.int64: "I64", torch.float16: "F16",
                       torch.bfloat16: "BF16", torch.float32: "F32"}


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF name for a GGUF tensor name; None for `rope_freqs` (read into the config instead).

    Raises KeyError for a name that has no place in a Llama/Qwen2/Qwen3 model.
    """
    base, _, suffix = gguf_name.rpartition(".")
    if base == "rope_freqs":
        return None
    if suffix in ("weight", "bias"):
        if base in _GLOBAL_TENSORS:
            return f"{_GLOBAL_TENSORS[base]}.{suffix}"
        parts = base.split(".")
        if (
            len(parts) == 3
            and parts[0] == "blk"
            and parts[1].isdigit()
            and parts[2] in _BLOCK_TENSORS
        ):
            return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}.{suffix}"
    raise KeyError(gguf_name)


def required_tensors(arch: str, config: dict[str, Any]) -> set[str]:
    per_layer = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "input_layernorm",
        "post_attention_layernorm",
    ]
    if arch == "qwen3":
        per_layer += ["self_attn.q_norm", "self_attn.k_norm"]
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        names.add("lm_head.weight")
    for i in range(config["num_hidden_layers"]):
        names.update(f"model.layers.{i}.{part}.weight" for part in per_layer)
    return names


def unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows (rotary halves interleaved per head)."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(1, 2).reshape(weights.shape)


class _SafetensorsStream:
    """Writes tensors one by one after a reserved header, then fills the header in.

    The quantized layout's tensor sizes are known only once each tensor is repacked, so the
    header (names, shapes, offsets) is written last into space reserved up front and padded
    with spaces, as the safetensors format allows.
    """

    def __init__(self, f: IO[bytes], reserve: int) -> None:
        self._f = f
        self._reserve = reserve + (-reserve % 8)
        self._header: dict[str, Any] = {}
        self._offset = 0
        f.write(b"\0" * (8 + self._reserve))

    def add(self, name: str, dtype: str, shape: tuple[int, ...], data: np.ndarray) -> None:
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        self._header[name] = {"dtype": dtype, "shape": list(shape),
                              "data_offsets": [self._offset, self._offset + raw.size]}
        self._f.write(raw.data)
        self._offset += raw.size

    def add_torch(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous()
        view = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        self.add(name, _SAFETENSORS_DTYPES[t.dtype], tuple(t.shape), view.numpy())

    def finish(self, metadata: dict[str, str]) -> None:
        header = json.dumps({**self._header, "__metadata__": metadata},
                            separators=(",", ":")).encode()
        if len(header) > self._reserve:
            raise AssertionError(f"safetensors header of {len(header)} bytes exceeds the "
                                 f"{self._reserve} reserved")
        self._f.seek(0)
        self._f.write(struct.pack("<Q", self._reserve))
        self._f.write(header + b" " * (self._reserve - len(header)))


def write_weights(
    path: pathlib.Path, reader: gguf.GGUFReader, arch: str, config: dict[str, Any],
    out: pathlib.Path, quantized: bool,
) -> dict[str, Any]:
    """Stream every tensor into one safetensors file: dequantized to float32, or (`quantized`)
    kept as a fornax QuantWeight where runtime/kernels/quant_format.py can hold its type.
    Returns a summary for the folder's marker: tensor counts and quantized bytes."""
    from tqdm import tqdm

    plan: list[tuple[str, gguf.ReaderTensor, tuple[int, ...]]] = []
    seen: set[str] = set()
    for t in reader.tensors:
        try:
            name = hf_tensor_name(t.name)
        except KeyError:
            raise ModelLoadError(
                f"{path}: tensor {t.name} has no place in a {arch} model (unsupported variant?)"
            ) from None
        if name is None:
            continue
        if name in seen:
            raise ModelLoadError(f"{path}: two tensors map to {name}")
        seen.add(name)
        plan.append((name, t, tuple(int(d) for d in reversed(t.shape.tolist()))))
    missing = sorted(required_tensors(arch, config) - seen)
    if missing:
        raise ModelLoadError(f"{path}: {len(missing)} tensors missing, e.g. {missing[:3]}")

    permute_heads = {
        "attn_q": config["num_attention_heads"],
        "attn_k": config["num_key_value_heads"],
    }
    summary: dict[str, Any] = {"quantized_tensors": 0, "quantized_bytes": 0, "dense_tensors": 0}
    # at most 5 entries (quantized data, scales, mins, meta, source) of under 160 bytes each
    reserve = 4096 + sum(5 * (len(name) + 160) for name, _, _ in plan)
    verb = "Repacking" if quantized else "Dequantizing"
    with open(out, "wb") as f:
        stream = _SafetensorsStream(f, reserve)
        bar = tqdm(plan, desc=f"{verb} {path.name}", unit="tensor", file=sys.stderr,
                   mininterval=0.5)
        for name, t, shape in bar:
            kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
            heads = permute_heads.get(kind) if arch == "llama" else None
            try:
                if quantized and _write_quantized(stream, name, t, shape, heads, summary):
                    continue
                _write_dense(stream, name, t, shape, heads, keep_16bit=quantized)
                summary["dense_tensors"] += 1
            except ModelLoadError:
                raise
            except Exception as exc:
                raise ModelLoadError(
                    f"{path}: cannot convert tensor {t.name} ({t.tensor_type.name}, shape "
                    f"{shape}): {type(exc).__name__}: {exc}"
                ) from exc
        stream.finish({"format": "pt", "source": "gguf",
                       "fornax_quantized": "1" if quantized else "0"})
        f.flush()
        os.fsync(f.fileno())
    return summary


def _write_quantized(stream: _SafetensorsStream, name: str, t: gguf.ReaderTensor,
                     shape: tuple[int, ...], heads: int | None, summary: dict[str, Any]) -> bool:
    """Write `t` as a QuantWeight; False when its type stays dense (F32, F16, Q5_K, ...)."""
    from fornax.runtime.kernels.quant_format import nbytes, repack_gguf, take_rows, to_tensors

    if len(shape) != 2 or t.tensor_type in (_T.F32, _T.F16, _T.BF16):
        return False
    qw = repack_gguf(t.tensor_type, np.asarray(t.data), (shape[0], shape[1]))
    if qw is None:
        return False
    if heads is not None:  # the Q/K de-permutation is a permutation of whole rows
        rows = unpermute(np.arange(shape[0]), heads)
        qw = take_rows(qw, torch.from_numpy(np.ascontiguousarray(rows)))
    for key, tensor in to_tensors(qw, name).items():
        stream.add_torch(key, tensor)
    summary["quantized_tensors"] += 1
    summary["quantized_bytes"] += nbytes(qw)
    return True


def _write_dense(stream: _SafetensorsStream, name: str, t: gguf.ReaderTensor,
                 shape: tuple[int, ...], heads: int | None, keep_16bit: bool) -> None:
    from gguf.quants import dequantize

    weights: np.ndarray
    if keep_16bit and t.tensor_type in _KEEP_16BIT:
        weights = np.ascontiguousarray(t.data).view(np.uint16).reshape(shape)
        dtype = _KEEP_16BIT[t.tensor_type]
    else:
        weights = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        dtype = "F32"
    if heads is not None:
        weights = unpermute(weights, heads)
    if dtype == "F32":
        weights = np.ascontiguousarray(weights, dtype="<f4")
    stream.add(name, dtype, shape, weights)
