"""The one weight loader: checkpoint tensors or seeded dummies -> model parameters (engine core)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from fornax.runtime.config import ModelConfig
from fornax.runtime.errors import ConfigError, ModelLoadError
from fornax.runtime.loaders.model_files import ModelFiles

if TYPE_CHECKING:
    from fornax.runtime.kernels.quant_format import QuantWeight

logger = logging.getLogger(__name__)

# A checkpoint tensor's place: (our parameter name, shard id for a fused parameter's loader)
Place = tuple[str, str | int | None]
# A model's mapping of a checkpoint tensor name to its place, or None for a tensor it skips
NameMap = Callable[[str], Place | None]
# A checkpoint tensor: dense, or GGUF blocks kept quantized (a prepared GGUF folder)
Weight = Union[torch.Tensor, "QuantWeight"]
# Checkpoint name fragments of fused parameters: (HF fragment, our fused fragment, shard id)
Renames = tuple[tuple[str, str, str | int | None], ...]
# Llama-family decoders: q/k/v into qkv_proj, gate/up into gate_up_proj
STACKED_DECODER: Renames = (
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matrix products run in hardware (elsewhere torch emulates them,
    slower than float32)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume no
        return False


def resolve_dtype(requested: str, hf_config: dict[str, Any], device: torch.device
                  ) -> torch.dtype:
    """The dtype weights load in. 'auto' on CPU is bfloat16 where the CPU has native bf16
    (about 3x float32's decode speed: half the bytes per weight, bf16 dot products) and float32
    elsewhere; on a GPU it is the checkpoint's own dtype."""
    if requested != "auto":
        return _TORCH_DTYPES[requested]
    if device.type == "cpu":
        dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        logger.info("dtype auto on this CPU: %s (%s)", str(dtype).removeprefix("torch."),
                    "native bf16: AVX512-BF16 or AMX" if dtype == torch.bfloat16
                    else "no native bf16")
        return dtype
    name = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32")
    return _TORCH_DTYPES.get(name, torch.float32)


def rename(name: str, renames: Renames) -> Place:
    """The first row of `renames` whose HF fragment is in `name` applied: (name, shard id)."""
    for hf_part, ours, shard in renames:
        if hf_part in name:
            return name.replace(hf_part, ours), shard
    return name, None


def load_model_weights(model: nn.Module, place: NameMap, files: ModelFiles,
                       model_config: ModelConfig, arch: str) -> None:
    """Fill every parameter: seeded dummy values (--load-format dummy) or the checkpoint's
    tensors; a parameter the checkpoint lacks is a ModelLoadError naming the first few."""
    if model_config.load_format == "dummy":
        init_dummy_weights(model, model_config.seed)
        return
    loaded = copy_weights(model, iterate_safetensors(files.weight_files), place, arch,
                          keep_quantized=model_config.quantization == "gguf")
    missing = sorted({name for name, _ in model.named_parameters()} - loaded)
    if missing:
        raise ModelLoadError(f"checkpoint in {files.path} lacks weights: "
                             + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))


def copy_weights(model: nn.Module, weights: Iterable[tuple[str, Weight]], place: NameMap,
                 arch: str, keep_quantized: bool = False) -> set[str]:
    """Copy checkpoint tensors into the parameters `place` names: through a fused parameter's
    `weight_loader` (with its shard id), else after a shape check. Quantized tensors go to
    their modules' quantized slot (`_QuantParts`) in a bfloat16 model, or any model with
    `keep_quantized` (--quantization gguf). Returns the names loaded."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    quant = _QuantParts(model, keep_quantized)
    for hf_name, tensor in weights:
        where = place(hf_name)
        if where is None:
            continue
        name, shard = where
        param = params.get(name)
        if param is None:
            raise ConfigError(f"checkpoint tensor {hf_name!r} has no place in {arch}")
        if not isinstance(tensor, torch.Tensor):
            quant.add(hf_name, name, param, shard, tensor)
            loaded.add(name)
            continue
        loader = getattr(param, "weight_loader", None)
        with torch.no_grad():
            if loader is not None:
                loader(param, tensor.to(param.dtype), shard)
            elif param.shape != tensor.shape:
                raise ConfigError(f"{hf_name}: checkpoint shape {tuple(tensor.shape)} does not "
                                  f"match the model's {tuple(param.shape)}")
            else:
                param.data.copy_(tensor)
        loaded.add(name)
    quant.finish()
    return loaded


def can_keep_quantized(dtype: torch.dtype) -> bool:
    """The native quantized kernel is built and takes this activation dtype (bf16, float32);
    without it, `quant_linear` would dequantize the whole weight on every call, far slower than
    the dense weight dequantized once at load."""
    from fornax.runtime.kernels.build import load_quant_linear

    return dtype in (torch.bfloat16, torch.float32) and load_quant_linear() is not None


class _QuantParts:
    """Quantized checkpoint tensors gathered per parameter (a fused qkv_proj gets q, k and v as
    row segments), then handed to the modules that read that parameter (`set_quant`: a linear's
    packed slot, an embedding and the LM head tied to it) while the dense parameter is emptied.
    A parameter they cannot hold (not on CPU, a module without `set_quant`, shards partly
    dense) gets the dequantized values instead, and so does every parameter of a model that is
    not bfloat16 unless `keep_all`: the quantized kernels round activations to int8 per group,
    so float32 (the exact reference) keeps the file's values dequantized, as before #20.
    """

    def __init__(self, model: nn.Module, keep_all: bool) -> None:
        self.model = model
        self.keep_all = keep_all
        self.parts: dict[int, tuple[nn.Parameter, list[tuple[int, QuantWeight]]]] = {}

    def add(self, hf_name: str, name: str, param: nn.Parameter, shard: str | int | None,
            qw: QuantWeight) -> None:
        owner = self.model.get_submodule(name.rpartition(".")[0])
        rows = getattr(owner, "shard_rows", None)
        offset, size = rows(shard) if shard is not None and rows else (0, param.shape[0])
        if param.ndim != 2 or (qw.out_features, qw.in_features) != (size, param.shape[1]):
            raise ConfigError(f"{hf_name}: checkpoint shape {(qw.out_features, qw.in_features)}"
                              f" does not match the model's {(size, *param.shape[1:])}")
        self.parts.setdefault(id(param), (param, []))[1].append((offset, qw))

    def finish(self) -> None:
        from fornax.runtime.kernels.quant_format import dequantize, nbytes

        kept: Counter[str] = Counter()
        kept_bytes = dense = 0
        for param, parts in self.parts.values():
            parts.sort(key=lambda part: part[0])
            ends = [offset + qw.out_features for offset, qw in parts]
            whole = [offset for offset, _ in parts] == [0, *ends[:-1]] and ends[-1] == len(param)
            readers = [m for m in self.model.modules() if getattr(m, "weight", None) is param]
            keep = (self.keep_all or param.dtype == torch.bfloat16) and can_keep_quantized(
                param.dtype)
            if keep and whole and param.device.type == "cpu" and readers and all(
                    hasattr(m, "set_quant") for m in readers):
                for module in readers:
                    module.set_quant([qw for _, qw in parts])  # type: ignore[operator]
                param.data = torch.empty((0, param.shape[1]), dtype=param.dtype,
                                         device=param.device)
                kept.update(qw.source_type for _, qw in parts)
                kept_bytes += sum(nbytes(qw) for _, qw in parts)
                continue
            for offset, qw in parts:
                param.data.narrow(0, offset, qw.out_features).copy_(dequantize(qw, param.dtype))
            dense += 1
        if self.parts:
            logger.info("GGUF weights kept quantized: %d tensors, %.1f MiB (%s); %d dequantized "
                        "at load%s", sum(kept.values()), kept_bytes / 2**20,
                        ", ".join(f"{n} {t}" for t, n in sorted(kept.items())) or "none", dense,
                        "" if kept or self.keep_all else
                        " (not a bfloat16 model: --quantization gguf keeps them quantized)")


def iterate_safetensors(files: list[Path]) -> Iterator[tuple[str, Weight]]:
    """Yield (name, tensor) from every file, with load errors naming the file. Tensors stored
    quantized (`<name>.qmeta` and friends, runtime/kernels/quant_format.py) come as one
    QuantWeight under `<name>`, copied out of the file's memory map."""
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                names = list(handle.keys())
                quantized: dict[str, list[str]] = {
                    n.removesuffix(".qmeta"): [] for n in names if n.endswith(".qmeta")}
                for name in names:
                    parts = quantized.get(name.rpartition(".")[0])
                    if parts is not None:
                        parts.append(name)
                    else:
                        yield name, handle.get_tensor(name)
                for prefix, parts in quantized.items():
                    yield prefix, _read_quant(handle, file, prefix, parts)
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"cannot read weights from {file}: {exc}") from exc


def _read_quant(handle: Any, file: Path, prefix: str, names: list[str]) -> QuantWeight:
    from fornax.runtime.kernels.quant_format import from_tensors

    tensors = {n: handle.get_tensor(n).clone() for n in names}
    try:
        qw = from_tensors(tensors, prefix)
    except (KeyError, ValueError, IndexError) as exc:
        raise ModelLoadError(f"{file}: quantized weight {prefix} is malformed: {exc}") from exc
    assert qw is not None  # its .qmeta is there
    return qw


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights of the real shapes, small enough to keep activations finite."""
    # Drawn where the weights live: an 8B model fills in seconds on a GPU, minutes on its host.
    gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or ".q_norm." in name or ".k_norm." in name:
                param.fill_(1.0)
                continue
            dev = param.device
            if dev not in gens:
                gens[dev] = torch.Generator(device=dev).manual_seed(seed)
            values = torch.empty(param.shape, dtype=torch.float32, device=dev).uniform_(
                -0.05, 0.05, generator=gens[dev])
            param.copy_(values.to(param.dtype))
