"""Turns a GGUF file into a cached model folder, once (engine-core process, model load)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pathlib
import shutil
import tempfile
import time
from io import BufferedReader
from typing import Any

import gguf
import numpy as np

from fornax.runtime.errors import ModelLoadError
from fornax.runtime.loaders.cache_folders import MARKER_NAME, build_lock, is_prepared
from fornax.runtime.loaders.cache_folders import cache_root as _cache_root
from fornax.runtime.loaders.gguf_weights import write_weights

logger = logging.getLogger(__name__)

# Bump when the prepared folder's content changes for the same GGUF bytes: old folders are then
# ignored (they sit next to the new ones until the cache is cleaned). 2: quantized folders.
FORMAT_VERSION = 2
_INDEX_NAME = "hash-index.json"
_INDEX_MAX_ENTRIES = 256

# general.architecture -> (HF architectures entry, HF model_type)
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}

# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------


def prepare_gguf(
    gguf_path: str | os.PathLike, cache_root: str | os.PathLike | None = None,
    *, quantized: bool = False,
) -> pathlib.Path:
    """Return a prepared folder (config, safetensors, tokenizer) for `gguf_path`.

    By default a plain HF folder with every tensor dequantized to float32, at
    `<cache_root>/gguf/<sha256 prefix>-v<FORMAT_VERSION>`. `quantized` keeps the Q8_0, Q4_0,
    Q4_1, Q4_K and Q6_K tensors as fornax QuantWeights (runtime/kernels/quant_format.py; only
    fornax loads that folder) at `<sha256 prefix>-q-v<FORMAT_VERSION>`; both can coexist.
    A folder is built once: later calls (and restarts) find its marker file and return at once.
    Raises `ModelLoadError` naming the file when it is missing, corrupt, truncated or of an
    unsupported kind.
    """
    path = pathlib.Path(gguf_path).expanduser()
    try:
        path = path.resolve(strict=True)
        st = path.stat()
    except OSError as exc:
        raise ModelLoadError(f"GGUF file not found: {path} ({exc.strerror or exc})") from exc
    if not path.is_file():
        raise ModelLoadError(f"GGUF path is not a file: {path}")

    gguf_dir = _cache_root(cache_root) / "gguf"
    try:
        gguf_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(f"cannot create the GGUF cache folder {gguf_dir}: {exc}") from exc

    digest = _content_hash(path, st, gguf_dir)
    key = f"{digest[:32]}-{'q-' if quantized else ''}v{FORMAT_VERSION}"
    final = gguf_dir / key
    if is_prepared(final, FORMAT_VERSION):
        logger.debug("GGUF cache hit: %s -> %s", path, final)
        return final

    with build_lock(gguf_dir / f".{key}.lock"):
        if is_prepared(final, FORMAT_VERSION):  # another process finished it while we waited
            return final
        _remove_stale_temps(gguf_dir)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=gguf_dir))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared read-only
        try:
            t0 = time.perf_counter()
            logger.info("Preparing GGUF %s into %s (one time)", path, final)
            _build(path, tmp, digest, quantized)
            _publish(tmp, final)
            logger.info("Prepared %s in %.1f s", path.name, time.perf_counter() - t0)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# ---------------------------------------------------------------------------------------------
# cache: location, content hash, lock, atomic publish
# ---------------------------------------------------------------------------------------------


def _content_hash(path: pathlib.Path, st: os.stat_result, gguf_dir: pathlib.Path) -> str:
    """sha256 of the file, remembered per (path, inode, size, mtime_ns) so restarts skip hashing."""
    index_path = gguf_dir / _INDEX_NAME
    stamp = f"{path}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"
    index: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(index_path.read_text())
        if isinstance(loaded, dict):
            index = {str(k): str(v) for k, v in loaded.items()}
    if stamp in index:
        return index[stamp]

    t0 = time.perf_counter()
    try:
        with open(path, "rb") as f:
            digest = _sha256_file(f)
    except OSError as exc:
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
    logger.debug("sha256 of %s took %.2f s", path, time.perf_counter() - t0)

    index = {k: v for k, v in index.items() if not k.startswith(f"{path}|")}
    index[stamp] = digest
    if len(index) > _INDEX_MAX_ENTRIES:
        index = dict(list(index.items())[-_INDEX_MAX_ENTRIES:])
    # The index is only a shortcut: losing a concurrent writer's entry costs one re-hash later.
    with contextlib.suppress(OSError):
        _write_text_atomic(index_path, json.dumps(index, indent=0))
    return digest


def _sha256_file(f: BufferedReader) -> str:
    if hasattr(hashlib, "file_digest"):
        return hashlib.file_digest(f, "sha256").hexdigest()
    h = hashlib.sha256()  # Python 3.10
    for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
    return h.hexdigest()



def _remove_stale_temps(gguf_dir: pathlib.Path, max_age_s: float = 24 * 3600) -> None:
    now = time.time()
    for entry in gguf_dir.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime > max_age_s:
                shutil.rmtree(entry, ignore_errors=True)


def _publish(tmp: pathlib.Path, final: pathlib.Path) -> None:
    """Move the finished temp folder into place; a racing process may already have done so."""
    for _ in range(3):
        try:
            os.replace(tmp, final)
            return
        except OSError:
            if is_prepared(final, FORMAT_VERSION):
                shutil.rmtree(tmp, ignore_errors=True)
                return
            shutil.rmtree(final, ignore_errors=True)  # a leftover without a valid marker
    raise ModelLoadError(f"cannot move the prepared model into the cache folder {final}")


def _write_text_atomic(path: pathlib.Path, text: str) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


# ---------------------------------------------------------------------------------------------
# building one prepared folder
# ---------------------------------------------------------------------------------------------


def _build(path: pathlib.Path, out: pathlib.Path, digest: str, quantized: bool) -> None:
    reader = _open_reader(path)
    meta = _Metadata(reader, path)
    arch = meta.string("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: unsupported GGUF architecture {arch!r} "
            f"(supported: {', '.join(_ARCHITECTURES)})"
        )
    tensors = {t.name: t for t in reader.tensors}
    _check_tensors(path, reader)

    config = _build_config(meta, arch, tensors, path)
    # here, not at the top: an engine that finds the folder prepared never imports `tokenizers`
    from fornax.runtime.loaders.gguf_tokenizer import build_tokenizer

    tokenizer, tokenizer_config, generation_config = build_tokenizer(meta, path, config)

    summary = write_weights(path, reader, arch, config, out / "model.safetensors", quantized)
    _write_json(out / "config.json", config)
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "generation_config.json", generation_config)
    marker = {
        "format_version": FORMAT_VERSION,
        "source": str(path),
        "sha256": digest,
        "architecture": arch,
        "num_tensors": len(reader.tensors),
        "quantized": quantized,
        **summary,
        "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_json(out / MARKER_NAME, marker, fsync=True)  # last: its presence means "complete"


class _PlainArrayReader(gguf.GGUFReader):
    """GGUFReader over a plain ndarray view of its memmap.

    GGUFReader slices `self.data` once per metadata value; slicing an `np.memmap` makes a memmap
    object each time, which is most of the cost of reading a 49k-token vocabulary (measured 5.7 s
    -> 2.4 s for SmolLM2). The bytes are the same mapped pages either way.
    """

    # GGUFReader types `data` as an attribute (np.memmap); this plain view is the point here
    @property  # type: ignore[override]
    def data(self) -> np.ndarray:
        return self._plain_data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain_data = np.asarray(value)


def _open_reader(path: pathlib.Path) -> gguf.GGUFReader:
    try:
        reader = _PlainArrayReader(path)
    except Exception as exc:  # numpy/struct/ValueError from a damaged header or truncated data
        raise ModelLoadError(
            f"{path}: not a readable GGUF file, corrupt or truncated ({type(exc).__name__}: {exc})"
        ) from exc
    if reader.byte_order != "I":
        raise ModelLoadError(f"{path}: byte-swapped (big-endian) GGUF files are not supported")
    return reader


def _check_tensors(path: pathlib.Path, reader: gguf.GGUFReader) -> None:
    """Fail before any work on truncated data or quantization types the gguf package cannot read."""
    from gguf.quants import _type_traits

    readable = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *_type_traits}
    file_size = path.stat().st_size
    for t in reader.tensors:
        if t.tensor_type not in readable:
            raise ModelLoadError(
                f"{path}: tensor {t.name} has quantization type {t.tensor_type.name}, "
                "which the gguf package cannot dequantize"
            )
        if t.data_offset + t.n_bytes > file_size or t.data.nbytes != t.n_bytes:
            raise ModelLoadError(
                f"{path}: truncated file: tensor {t.name} needs bytes up to "
                f"{t.data_offset + t.n_bytes} but the file has {file_size}"
            )


class _Metadata:
    """Typed access to the GGUF key/value fields, with errors that name the file and key."""

    def __init__(self, reader: gguf.GGUFReader, path: pathlib.Path) -> None:
        self._fields = reader.fields
        self._path = path

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as exc:
            raise ModelLoadError(f"{self._path}: cannot read metadata key {key}: {exc}") from exc

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelLoadError(f"{self._path}: metadata key {key} is missing")
        return value

    def string(self, key: str) -> str:
        value = self.require(key)
        if not isinstance(value, str):
            raise ModelLoadError(f"{self._path}: metadata key {key} is not a string")
        return value

    def strings(self, key: str) -> list[str] | None:
        """A string array, decoded leniently (a few files carry invalid UTF-8 in token pieces)."""
        field = self._fields.get(key)
        if field is None:
            return None
        return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


def _build_config(
    meta: _Metadata, arch: str, tensors: dict[str, gguf.ReaderTensor], path: pathlib.Path
) -> dict[str, Any]:
    def num(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{path}: metadata key {arch}.{key} is missing")
        if isinstance(value, list):  # per-layer values: only uniform ones are supported
            if len(set(value)) != 1:
                raise ModelLoadError(f"{path}: per-layer {arch}.{key} values are not supported")
            value = value[0]
        return value

    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{path}: tensor token_embd.weight is missing")
    hidden = int(num("embedding_length"))
    num_heads = int(num("attention.head_count"))
    num_kv_heads = int(num("attention.head_count_kv", num_heads))
    head_dim = meta.get(f"{arch}.attention.key_length")
    if head_dim is None:
        head_dim = meta.get(f"{arch}.rope.dimension_count") if arch == "llama" else None
    head_dim = int(head_dim) if head_dim is not None else hidden // num_heads
    vocab_size = int(tensors["token_embd.weight"].shape[1])  # GGUF shape is [hidden, vocab]
    architectures, model_type = _ARCHITECTURES[arch]

    config: dict[str, Any] = {
        "architectures": [architectures],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(num("feed_forward_length")),
        "num_hidden_layers": int(num("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(num("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(num("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(num("context_length")),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for name, key in (
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("padding", "pad_token_id"),
    ):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            config[key] = int(value)
    rope_scaling = _rope_scaling(meta, arch, config, tensors, path)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(
    meta: _Metadata, arch: str, config: dict[str, Any], tensors: dict[str, gguf.ReaderTensor],
    path: pathlib.Path,
) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind is None and meta.get(f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", meta.get(f"{arch}.rope.scale_linear")
    if "rope_freqs.weight" in tensors:
        if kind not in (None, "none"):
            raise ModelLoadError(f"{path}: rope_freqs together with rope scaling {kind!r}")
        return _llama3_rope_scaling(tensors["rope_freqs.weight"], config, path)
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        attn_factor = meta.get(f"{arch}.rope.scaling.attn_factor")
        if attn_factor is not None:
            scaling["attention_factor"] = float(attn_factor)
        return scaling
    raise ModelLoadError(f"{path}: unsupported rope scaling type {kind!r}")


def _llama3_rope_scaling(
    tensor: gguf.ReaderTensor, config: dict[str, Any], path: pathlib.Path
) -> dict[str, Any]:
    """Recover Llama-3.x rope_scaling from llama.cpp's per-frequency `rope_freqs` factors."""
    factors = np.asarray(tensor.data, dtype=np.float64).reshape(-1)
    head_dim, theta = config["head_dim"], config["rope_theta"]
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = float(factors.max())
    for original in (8192, 4096, 2048, 16384, 32768, 131072):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0)):
            expected = _llama3_factors(freqs, factor, low, high, original)
            if expected.shape == factors.shape and np.allclose(expected, factors, rtol=1e-3):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": original,
                }
    raise ModelLoadError(f"{path}: rope_freqs does not match a Llama-3 rope scaling")


def _llama3_factors(
    freqs: np.ndarray, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    # Same formula as llama.cpp's convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors).
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out)


def _write_json(path: pathlib.Path, data: dict[str, Any], fsync: bool = False) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
        if fsync:
            f.flush()
            os.fsync(f.fileno())
