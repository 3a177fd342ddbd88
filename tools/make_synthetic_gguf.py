"""Write a seeded random-weight ~1B Llama-shape GGUF (Q4_0/Q4_1/Q8_0) into the fornax cache; a CLI tool.

For benchmarks where memory bandwidth dominates (`bench serve --model-path ...`, side by side with
llama.cpp): the packaged SmolLM2-135M is too small to show it. The tokenizer, its merges and the
chat template are copied from the packaged SmolLM2 GGUF (vocab 49152), so both fornax and
llama-server load the file and tokenize text. Weights are normal(0, 0.02) per tensor, quantized with
the `gguf` package's quantizers (the reference block formats llama.cpp reads); the norms are ones
(F32); the token embedding (tied LM head) is Q8_0 for the 4-bit files, as llama.cpp's quantizer
keeps it. The file is written to a temporary name and renamed, so a second call returns at once.

    python -m tools.make_synthetic_gguf [--quant Q4_0,Q4_1,Q8_0] [--shape llama-1b]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GENERATOR_VERSION", "QUANTS", "SHAPES", "ensure_synthetic_gguf", "main",
           "synthetic_gguf_path"]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the files change meaning (it is part of the cache path)
QUANTS: tuple[str, ...] = ("Q4_0", "Q4_1", "Q8_0")
SHAPES: dict[str, dict[str, int]] = {
    # ~1.07B parameters (tied embeddings): Llama-3.2-1B's body with SmolLM2's vocabulary
    "llama-1b": {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8,
                 "intermediate": 8192, "context": 4096},
    # a few MB: the tool's own test
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128,
             "context": 512},
}
_STD = 0.02
_COPIED_PREFIXES = ("tokenizer.",)


def synthetic_gguf_path(quant: str, shape: str = "llama-1b",
                        cache: str | os.PathLike[str] | None = None) -> Path:
    """<fornax cache>/synthetic-gguf/v<GENERATOR_VERSION>/<shape>-<quant>.gguf."""
    from fornax.runtime.loaders.cache_folders import cache_root

    return cache_root(cache) / "synthetic-gguf" / f"v{GENERATOR_VERSION}" / f"{shape}-{quant}.gguf"


def _tensors(dims: dict[str, int], vocab: int) -> Iterator[tuple[str, tuple[int, ...], bool]]:
    """(name, numpy shape [out, in], is_matrix) in llama.cpp's tensor naming."""
    h, inter = dims["hidden"], dims["intermediate"]
    head_dim = h // dims["heads"]
    kv = dims["kv_heads"] * head_dim
    yield "token_embd.weight", (vocab, h), True
    for i in range(dims["layers"]):
        yield f"blk.{i}.attn_norm.weight", (h,), False
        yield f"blk.{i}.attn_q.weight", (h, h), True
        yield f"blk.{i}.attn_k.weight", (kv, h), True
        yield f"blk.{i}.attn_v.weight", (kv, h), True
        yield f"blk.{i}.attn_output.weight", (h, h), True
        yield f"blk.{i}.ffn_norm.weight", (h,), False
        yield f"blk.{i}.ffn_gate.weight", (inter, h), True
        yield f"blk.{i}.ffn_up.weight", (inter, h), True
        yield f"blk.{i}.ffn_down.weight", (h, inter), True
    yield "output_norm.weight", (h,), False


def _tensor_type(name: str, is_matrix: bool, quant: str) -> Any:
    from gguf import GGMLQuantizationType

    if not is_matrix:
        return GGMLQuantizationType.F32
    if name == "token_embd.weight" and quant.startswith("Q4"):
        return GGMLQuantizationType.Q8_0
    return GGMLQuantizationType[quant]


def _copy_metadata(reader: Any, writer: Any) -> None:
    """The source file's tokenizer.* keys (vocabulary, merges, special ids, chat template)."""
    from gguf import GGUFValueType

    for key, field in reader.fields.items():
        if not key.startswith(_COPIED_PREFIXES):
            continue
        main_type = field.types[0]
        if main_type == GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), main_type, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), main_type)


def write_synthetic_gguf(path: Path, quant: str, shape: str = "llama-1b",
                         source: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Write the file at `path` (its folder must exist); returns what it holds."""
    import gguf

    from fornax.runtime.loaders.default_model import default_model_path

    dims = SHAPES[shape]
    reader = gguf.GGUFReader(source or default_model_path())
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"fornax synthetic {shape} {quant}")
    writer.add_context_length(dims["context"])
    writer.add_embedding_length(dims["hidden"])
    writer.add_block_count(dims["layers"])
    writer.add_feed_forward_length(dims["intermediate"])
    writer.add_head_count(dims["heads"])
    writer.add_head_count_kv(dims["kv_heads"])
    writer.add_rope_dimension_count(dims["hidden"] // dims["heads"])
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{quant}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _copy_metadata(reader, writer)
    plan = [(name, shp, _tensor_type(name, mat, quant)) for name, shp, mat in
            _tensors(dims, vocab)]
    for name, shp, qtype in plan:
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor_info(name, shp, np.dtype(np.float32), 4 * int(np.prod(shp)))
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shp, qtype)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8),
                                   int(np.prod(byte_shape)), raw_dtype=qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    params = 0
    for i, (name, shp, qtype) in enumerate(plan):
        params += int(np.prod(shp))
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.write_tensor_data(np.ones(shp, dtype=np.float32))
            continue
        weights = rng.standard_normal(shp, dtype=np.float32) * np.float32(_STD)
        writer.write_tensor_data(gguf.quants.quantize(weights, qtype))
        if i % 20 == 0:
            print(f"  {name} ({i + 1}/{len(plan)})", flush=True)
    writer.close()
    return {"shape": shape, **dims, "vocab": vocab, "quant": quant, "parameters": params,
            "seed": seed, "generator_version": GENERATOR_VERSION}


def ensure_synthetic_gguf(quant: str, shape: str = "llama-1b",
                          cache: str | os.PathLike[str] | None = None,
                          source: Path | None = None) -> Path:
    """The cached file for (shape, quant): written once, later calls return at once."""
    from fornax.runtime.loaders.cache_folders import build_lock

    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    path = synthetic_gguf_path(quant, shape, cache)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(path.parent / f".{path.name}.lock"):
        if path.is_file():
            return path
        start = time.monotonic()
        print(f"writing {path} ...", flush=True)
        tmp = path.with_name(path.name + ".tmp")
        info = write_synthetic_gguf(tmp, quant, shape, source)
        info["write_seconds"] = round(time.monotonic() - start, 1)
        info["bytes"] = tmp.stat().st_size
        path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(path)
        print(f"wrote {path}: {info['bytes'] / 1e9:.2f} GB, {info['parameters'] / 1e9:.2f}B "
              f"parameters, {info['write_seconds']} s", flush=True)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.make_synthetic_gguf",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quant", default=",".join(QUANTS),
                        help=f"comma-separated subset of {','.join(QUANTS)}")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--cache", default=None, help="cache root (default: the fornax cache)")
    args = parser.parse_args(argv)
    quants = [q.strip() for q in args.quant.split(",") if q.strip()]
    for quant in quants:
        if quant not in QUANTS:
            parser.error(f"--quant: {quant!r} is not one of {', '.join(QUANTS)}")
    for quant in quants:
        print(ensure_synthetic_gguf(quant, args.shape, args.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
