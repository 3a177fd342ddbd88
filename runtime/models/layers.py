"""Model building blocks with vLLM-style names and per-shard weight loaders (engine core)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fornax.runtime.kernels.packing import (
    PackedWeight,
    packed_linear,
    quant_embedding,
    quant_packed,
)

if TYPE_CHECKING:
    from fornax.runtime.kernels.quant_format import QuantWeight


class RMSNorm(nn.Module):
    """RMS norm computed in float32 and cast back, as the HF reference does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.fused = None  # FusedCpuOps on bf16 CPU models (cpu_fused_ops.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and x.dtype == torch.bfloat16:
            return self.fused.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _default_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b), output dimension shardable across tensor-parallel ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size))
        self.bias = nn.Parameter(torch.zeros(output_size)) if bias else None
        self.packed_weight: PackedWeight | None = None  # CPU bf16 packs (cpu_packing.py)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        _default_loader(param, loaded)

    def set_quant(self, parts: list[QuantWeight]) -> None:
        """Hold the weight quantized: its row segments in order (loaders/weights.py then empties
        the dense `weight`)."""
        self.packed_weight = quant_packed(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            return packed_linear(x, self.packed_weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(ColumnParallelLinear):
    """y = x W^T (+ b), input dimension shardable across ranks (all-reduce after)."""


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections fused in one matmul (e.g. gate and up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = output_sizes

    def shard_rows(self, shard_id: str | int) -> tuple[int, int]:
        """(first row, number of rows) of shard `shard_id` in the fused weight."""
        idx = int(shard_id)
        return sum(self.output_sizes[:idx]), self.output_sizes[idx]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        if shard_id is None:
            _default_loader(param, loaded)
            return
        offset, size = self.shard_rows(shard_id)
        _default_loader(param.data.narrow(0, offset, size), loaded)  # type: ignore[arg-type]


class QKVParallelLinear(MergedColumnParallelLinear):
    """Q, K and V projections fused in one matmul; shards named 'q', 'k', 'v'."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False) -> None:
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, [self.q_size, self.kv_size, self.kv_size], bias)

    def shard_rows(self, shard_id: str | int) -> tuple[int, int]:
        return super().shard_rows({"q": 0, "k": 1, "v": 2}.get(shard_id, shard_id))  # type: ignore[arg-type]


class VocabParallelEmbedding(nn.Module):
    """Token embedding table, vocabulary shardable across ranks."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    quant_weight: QuantWeight | None = None  # GGUF table kept quantized (set_quant)

    def set_quant(self, parts: list[QuantWeight]) -> None:
        quant = quant_packed(parts).quant
        if isinstance(quant, list):
            raise ValueError("an embedding table's rows must be of one quantized kind")
        self.quant_weight = quant

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.quant_weight is not None:
            return quant_embedding(self.quant_weight, input_ids, self.weight.dtype)
        return F.embedding(input_ids, self.weight)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to vocabulary logits; may share its weight with the embedding."""

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    packed_weight: PackedWeight | None = None  # CPU bf16 packs or quantized (kernels/packing.py)

    def set_quant(self, parts: list[QuantWeight]) -> None:
        self.packed_weight = quant_packed(parts)  # tied: the embedding's QuantWeight, shared

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            return packed_linear(hidden, self.packed_weight, None)
        return F.linear(hidden, self.weight)


class SiluAndMul(nn.Module):
    """silu(gate) * up over the fused [gate | up] projection."""

    fused = None  # FusedCpuOps on bf16 CPU models (cpu_fused_ops.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and x.dtype == torch.bfloat16:
            return self.fused.silu_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
