"""Weight sources: safetensors files (single or sharded) and seeded dummy weights (engine core)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from fornax.runtime.errors import ModelLoadError

logger = logging.getLogger(__name__)


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
