"""The one weight loader: checkpoint tensors or seeded dummies -> model parameters (engine core)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from fornax.runtime.config import ModelConfig
from fornax.runtime.errors import ConfigError, ModelLoadError
from fornax.runtime.loaders.model_files import ModelFiles

logger = logging.getLogger(__name__)

# A checkpoint tensor's place: (our parameter name, shard id for a fused parameter's loader)
Place = tuple[str, str | int | None]
# A model's mapping of a checkpoint tensor name to its place, or None for a tensor it skips
NameMap = Callable[[str], Place | None]
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
    loaded = copy_weights(model, iterate_safetensors(files.weight_files), place, arch)
    missing = sorted({name for name, _ in model.named_parameters()} - loaded)
    if missing:
        raise ModelLoadError(f"checkpoint in {files.path} lacks weights: "
                             + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))


def copy_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], place: NameMap,
                 arch: str) -> set[str]:
    """Copy checkpoint tensors into the parameters `place` names: through a fused parameter's
    `weight_loader` (with its shard id), else after a shape check. Returns the names loaded."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for hf_name, tensor in weights:
        where = place(hf_name)
        if where is None:
            continue
        name, shard = where
        param = params.get(name)
        if param is None:
            raise ConfigError(f"checkpoint tensor {hf_name!r} has no place in {arch}")
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
    return loaded


def iterate_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every file, with load errors naming the file."""
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"cannot read weights from {file}: {exc}") from exc


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
