"""CTranslate2 Whisper `model.bin` reader and its conversion to HF Whisper tensors (engine core, model load).

The CTranslate2 binary layout (versions 1-6) is a flat list of named variables:

    u32 binary_version
    (version >= 2) str spec_name, u32 spec_revision
    u32 num_variables, then per variable:
        str name, u8 rank, u32 dims[rank],
        (version >= 4) u8 dtype_id, u32 num_bytes   | (older) u8 item_size, u32 num_items
        raw little-endian bytes
    (version >= 3) u32 num_aliases, then (str alias, str target) pairs

where `str` is a u16 length (the terminating NUL included) followed by the bytes. Whisper stores
the self-attention Q/K/V fused in one matrix and the cross-attention K/V in another, with zero K
biases, and ties the output projection to the token embedding (an alias). Everything here is numpy:
no torch is needed to read or convert.
"""

from __future__ import annotations

import logging
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fornax.runtime.errors import ModelLoadError

logger = logging.getLogger(__name__)

MAX_BINARY_VERSION = 6
# CTranslate2's DataType enum: FLOAT32, INT8, INT16, INT32, FLOAT16, BFLOAT16
_DTYPES: dict[int, np.dtype] = {0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"),
                                3: np.dtype("<i4"), 4: np.dtype("<f2"), 5: np.dtype("<u2")}
_ITEM_SIZE_DTYPES: dict[int, np.dtype] = {4: np.dtype("<f4"), 2: np.dtype("<f2"), 1: np.dtype("i1")}


@dataclass
class Ct2Model:
    """The variables of one CTranslate2 model file (arrays may view a memory map)."""

    spec_name: str
    revision: int
    binary_version: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)
    bf16_names: set[str] = field(default_factory=set)  # stored as raw uint16 bfloat16 bits

    def get(self, name: str) -> np.ndarray:
        name = self.aliases.get(name, name)
        try:
            return self.variables[name]
        except KeyError:
            raise ModelLoadError(f"the CTranslate2 model lacks the variable {name!r}") from None

    def float_weight(self, name: str) -> np.ndarray:
        """A weight as float32, dequantizing int8 weights with their `_scale`."""
        value = self.get(name)
        if value.dtype == np.int8:
            scale = self.variables.get(name + "_scale")
            if scale is None:
                raise ModelLoadError(f"int8 variable {name!r} has no {name}_scale")
            scale = scale.astype(np.float32)
            return value.astype(np.float32) / (scale[:, None] if scale.ndim == 1 else scale)
        if value.dtype == np.uint16 and name in self.bf16_names:
            return (value.astype(np.uint32) << 16).view(np.float32)
        return value.astype(np.float32)

    def scalar(self, name: str, default: int | None = None) -> int:
        value = self.variables.get(name)
        if value is None:
            if default is None:
                raise ModelLoadError(f"the CTranslate2 model lacks the variable {name!r}")
            return default
        return int(np.asarray(value).reshape(-1)[0])


class _Reader:
    def __init__(self, buf: memoryview | bytes, source: str) -> None:
        self.buf, self.pos, self.source = buf, 0, source

    def take(self, n: int) -> memoryview | bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ModelLoadError(f"{self.source} is truncated or corrupt (read past the end at "
                                 f"byte {self.pos})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.unpack("H")))
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise ModelLoadError(f"{self.source} is corrupt (a variable name is not UTF-8)") from None


def read_ct2_model(path: str | Path) -> Ct2Model:
    """Parse a CTranslate2 `model.bin`; arrays view a read-only memory map of the file."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            buf: memoryview | bytes = memoryview(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    r = _Reader(buf, str(path))
    version = r.unpack("I")
    if not 1 <= version <= MAX_BINARY_VERSION:
        raise ModelLoadError(f"{path} is not a CTranslate2 model (binary version {version}; "
                             f"fornax reads versions 1-{MAX_BINARY_VERSION})")
    spec, revision = "", 1
    if version >= 2:
        spec, revision = r.string(), r.unpack("I")
    variables: dict[str, np.ndarray] = {}
    bf16: set[str] = set()
    for _ in range(r.unpack("I")):
        name = r.string()
        shape = [r.unpack("I") for _ in range(r.unpack("B"))]
        if version >= 4:
            type_id, num_bytes = r.unpack("B"), r.unpack("I")
            dtype = _DTYPES.get(type_id)
            if dtype is None:
                raise ModelLoadError(f"{path}: variable {name!r} has unknown dtype id {type_id}")
            if type_id == 5:
                bf16.add(name)
        else:
            item_size, num_items = r.unpack("B"), r.unpack("I")
            dtype = _ITEM_SIZE_DTYPES.get(item_size)
            if dtype is None:
                raise ModelLoadError(f"{path}: variable {name!r} has item size {item_size}")
            num_bytes = num_items * item_size
        count = int(np.prod(shape)) if shape else 1
        if count * dtype.itemsize != num_bytes:
            raise ModelLoadError(f"{path} is corrupt: {name!r} has shape {shape} but "
                                 f"{num_bytes} bytes")
        data = np.frombuffer(r.take(num_bytes), dtype=dtype, count=count)
        variables[name] = data.reshape(shape) if shape else data
    aliases: dict[str, str] = {}
    if version >= 3:
        for _ in range(r.unpack("I")):
            alias = r.string()
            aliases[alias] = r.string()
    return Ct2Model(spec, revision, version, variables, aliases, bf16)


# ---- Whisper: CTranslate2 names -> HF WhisperForConditionalGeneration names ---------------------

_LAYER_RE = re.compile(r"^(encoder|decoder)/layer_(\d+)/")


def _count_layers(model: Ct2Model, side: str) -> int:
    layers = {int(m.group(2)) for name in model.variables
              if (m := _LAYER_RE.match(name)) and m.group(1) == side}
    return max(layers) + 1 if layers else 0


def _linear(model: Ct2Model, src: str, dst: str, out: dict[str, np.ndarray],
            bias: bool = True) -> None:
    out[f"{dst}.weight"] = model.float_weight(f"{src}/weight")
    if bias:
        out[f"{dst}.bias"] = model.float_weight(f"{src}/bias")


def _norm(model: Ct2Model, src: str, dst: str, out: dict[str, np.ndarray]) -> None:
    out[f"{dst}.weight"] = model.float_weight(f"{src}/gamma")
    out[f"{dst}.bias"] = model.float_weight(f"{src}/beta")


def _split_fused(model: Ct2Model, src: str, dst: str, parts: tuple[str, ...],
                 out: dict[str, np.ndarray]) -> None:
    """Split a fused [n*d, d] projection; the K part has no bias in Whisper (CT2 stores zeros)."""
    weight = model.float_weight(f"{src}/weight")
    bias = model.float_weight(f"{src}/bias")
    n = len(parts)
    if weight.shape[0] % n:
        raise ModelLoadError(f"fused projection {src} has {weight.shape[0]} rows, not {n} parts")
    for part, w, b in zip(parts, np.split(weight, n), np.split(bias, n)):
        out[f"{dst}.{part}.weight"] = w
        if part == "k_proj":
            if np.abs(b).max(initial=0.0) > 1e-6:
                logger.warning("%s: non-zero K bias dropped (Whisper's K projection has none)", src)
        else:
            out[f"{dst}.{part}.bias"] = b


def _layer(model: Ct2Model, src: str, dst: str, out: dict[str, np.ndarray], cross: bool) -> None:
    """One transformer layer: self-attention, cross-attention (decoder layers), feed-forward."""
    _split_fused(model, f"{src}/self_attention/linear_0", f"{dst}.self_attn",
                 ("q_proj", "k_proj", "v_proj"), out)
    _linear(model, f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj", out)
    _norm(model, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm", out)
    if cross:
        _linear(model, f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj", out)
        _split_fused(model, f"{src}/attention/linear_1", f"{dst}.encoder_attn",
                     ("k_proj", "v_proj"), out)
        _linear(model, f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj", out)
        _norm(model, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm", out)
    _linear(model, f"{src}/ffn/linear_0", f"{dst}.fc1", out)
    _linear(model, f"{src}/ffn/linear_1", f"{dst}.fc2", out)
    _norm(model, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm", out)


def whisper_state_dict(model: Ct2Model) -> dict[str, np.ndarray]:
    """HF-named float32 tensors of a CTranslate2 Whisper model (no proj_out: it is tied)."""
    if model.spec_name and "Whisper" not in model.spec_name:
        raise ModelLoadError(f"the CTranslate2 model is a {model.spec_name}, not a Whisper model")
    out: dict[str, np.ndarray] = {}
    enc, dec = "model.encoder", "model.decoder"
    for i in (1, 2):
        _linear(model, f"encoder/conv{i}", f"{enc}.conv{i}", out)
    out[f"{enc}.embed_positions.weight"] = model.float_weight("encoder/position_encodings/encodings")
    _norm(model, "encoder/layer_norm", f"{enc}.layer_norm", out)
    for i in range(_count_layers(model, "encoder")):
        _layer(model, f"encoder/layer_{i}", f"{enc}.layers.{i}", out, cross=False)
    out[f"{dec}.embed_tokens.weight"] = model.float_weight("decoder/embeddings/weight")
    out[f"{dec}.embed_positions.weight"] = model.float_weight("decoder/position_encodings/encodings")
    _norm(model, "decoder/layer_norm", f"{dec}.layer_norm", out)
    for i in range(_count_layers(model, "decoder")):
        _layer(model, f"decoder/layer_{i}", f"{dec}.layers.{i}", out, cross=True)
    projection = model.aliases.get("decoder/projection/weight")
    if projection is None and "decoder/projection/weight" in model.variables:
        proj = model.float_weight("decoder/projection/weight")
        if not np.array_equal(proj, out[f"{dec}.embed_tokens.weight"]):
            raise ModelLoadError("the output projection is not tied to the token embedding; "
                                 "fornax's Whisper expects tied weights")
    return out


def whisper_hf_config(model: Ct2Model, ids: dict[str, int], ct2_config: dict[str, Any],
                      torch_dtype: str) -> dict[str, Any]:
    """An HF WhisperConfig dict built from the tensor shapes and the special-token ids."""
    conv1 = model.get("encoder/conv1/weight")
    d_model, num_mel_bins = int(conv1.shape[0]), int(conv1.shape[1])
    vocab = int(model.get("decoder/embeddings/weight").shape[0])
    enc_ffn = int(model.get("encoder/layer_0/ffn/linear_0/weight").shape[0])
    dec_ffn = int(model.get("decoder/layer_0/ffn/linear_0/weight").shape[0])
    enc_heads = model.scalar("encoder/num_heads", max(1, d_model // 64))
    dec_heads = model.scalar("decoder/num_heads", enc_heads)
    eot, sot = ids["eot"], ids["sot"]
    return {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "vocab_size": vocab,
        "num_mel_bins": num_mel_bins,
        "d_model": d_model,
        "encoder_layers": _count_layers(model, "encoder"),
        "decoder_layers": _count_layers(model, "decoder"),
        "encoder_attention_heads": enc_heads,
        "decoder_attention_heads": dec_heads,
        "encoder_ffn_dim": enc_ffn,
        "decoder_ffn_dim": dec_ffn,
        "max_source_positions": int(model.get("encoder/position_encodings/encodings").shape[0]),
        "max_target_positions": int(model.get("decoder/position_encodings/encodings").shape[0]),
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": sot,
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin") or [220, eot]),
        "suppress_tokens": list(ct2_config.get("suppress_ids") or []),
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
