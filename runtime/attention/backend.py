"""The small interface every attention backend implements, and the per-step common metadata."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass
class CommonAttentionMetadata:
    """What the model runner knows about one step's flat varlen batch.

    Host arrays end in `_np`; tensors live on the model's device.
    """

    query_start_loc_np: np.ndarray  # [num_reqs + 1] int32, token offsets of each request
    seq_lens_np: np.ndarray  # [num_reqs] int32, context length after this step
    block_table_np: np.ndarray  # [num_reqs, max_blocks_per_req] int32 (host only: every
    # backend plans from it; a device copy per step would be a transfer nothing reads)
    slot_mapping: torch.Tensor  # [num_tokens] int64, flat slot each new token's K/V goes to
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int


class AttentionBackend(ABC):
    """Writes new K/V into the paged cache and attends over each request's context."""

    name: str = "abstract"
    supports_cuda_graphs: bool = False  # True: build_graph_metadata plans fixed-address buffers

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        self.scale = head_dim**-0.5

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        """One layer's cache: [num_blocks, 2 (K, V), block_size, num_kv_heads, head_dim]."""
        return (num_blocks, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @abstractmethod
    def build_metadata(self, common: CommonAttentionMetadata) -> Any:
        """Once per step, before the forward: everything the layers share."""

    def build_graph_metadata(self, common: CommonAttentionMetadata, bucket: int) -> Any:
        """Like build_metadata, for a pure-decode batch padded to a captured bucket: everything
        the captured kernels read must sit at addresses fixed per bucket."""
        raise NotImplementedError(f"the {self.name} backend cannot run inside CUDA graphs")

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: Any, scale: float | None = None) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]."""


def make_attention_backend(name: str, **kwargs: Any) -> AttentionBackend:
    """The backend by name; 'auto' picks flashinfer on CUDA when installed, cpu_paged on CPU
    when its C kernel builds, else torch_ref."""
    device: torch.device = kwargs["device"]
    if name == "auto":
        name = "torch_ref"
        if device.type == "cpu":
            from fornax.runtime.attention.cpu_paged import CpuPagedBackend

            try:
                return CpuPagedBackend(**kwargs)
            except RuntimeError as exc:
                logger.info("cpu_paged attention unavailable (%s); using torch_ref", exc)
        elif device.type == "cuda":
            try:
                from fornax.runtime.attention.flashinfer_backend import check_supported

                check_supported(kwargs["head_dim"], kwargs["dtype"], device)
                import flashinfer  # noqa: F401

                name = "flashinfer"
            except (ImportError, ValueError) as exc:
                logger.warning("attention backend auto: torch_ref (%s)", exc)
    if name == "torch_ref":
        from fornax.runtime.attention.torch_ref import TorchRefBackend

        return TorchRefBackend(**kwargs)
    if name == "cpu_paged":
        from fornax.runtime.attention.cpu_paged import CpuPagedBackend

        return CpuPagedBackend(**kwargs)
    if name == "flashinfer":
        from fornax.runtime.attention.flashinfer_backend import FlashInferBackend

        return FlashInferBackend(**kwargs)
    raise ValueError(f"unknown attention backend {name!r}")
