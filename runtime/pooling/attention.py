"""KV-free attention over a flat batch of whole sequences, for pooling models (engine core).

A pooling step holds complete prompts only (no chunks, no cache), so attention needs no paged
layout and no padding: the runner lays sequences out sorted by length, each run of equal-length
sequences is a plain [n, L] view of the flat tokens, and one SDPA call per run attends within each
sequence (bidirectional for encoders, causal for decoders). On CPU this beats one padded, masked
call by about 3x for short sentences, and it never pays for padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class VarlenMetadata:
    """Runs of consecutive equal-length sequences in the flat batch."""

    groups: list[tuple[int, int, int, int]]  # (token start, token end, num seqs, seq len)
    num_tokens: int
    causal: bool


def build_varlen_metadata(seq_lens_np: np.ndarray, causal: bool) -> VarlenMetadata:
    """Metadata for sequences laid out back to back (sort them by length for fewest runs)."""
    groups: list[tuple[int, int, int, int]] = []
    start = 0
    i, n = 0, len(seq_lens_np)
    lens = seq_lens_np.tolist()
    while i < n:
        length = lens[i]
        j = i + 1
        while j < n and lens[j] == length:
            j += 1
        end = start + (j - i) * length
        groups.append((start, end, j - i, length))
        start, i = end, j
    return VarlenMetadata(groups, start, causal)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VarlenMetadata,
                     scale: float | None = None) -> torch.Tensor:
    """q: [T, Hq, D], k/v: [T, Hkv, D] (flat, sequences back to back) -> [T, Hq, D]."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    gqa = num_heads != k.shape[1]

    def attend(s: int, e: int, n: int, length: int) -> torch.Tensor:  # -> [n, Hq, L, D]
        def view(x: torch.Tensor) -> torch.Tensor:
            return x[s:e].view(n, length, x.shape[1], head_dim).transpose(1, 2)

        return F.scaled_dot_product_attention(view(q), view(k), view(v), is_causal=meta.causal,
                                              scale=scale, enable_gqa=gqa)

    if len(meta.groups) == 1:
        s, e, n, length = meta.groups[0]
        return attend(s, e, n, length).transpose(1, 2).reshape(e - s, num_heads, head_dim)
    out = q.new_empty(meta.num_tokens, num_heads, head_dim)
    for s, e, n, length in meta.groups:
        out[s:e].view(n, length, num_heads, head_dim).copy_(attend(s, e, n, length).transpose(1, 2))
    return out


class VarlenAttentionBackend:
    """The attention-backend interface the decoder layers call (`forward(q, k, v, cache, meta)`),
    without a KV cache: causal attention within each sequence of the step."""

    name = "varlen"

    def __init__(self, head_dim: int) -> None:
        self.scale = head_dim**-0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor | None, metadata: VarlenMetadata,
                scale: float | None = None) -> torch.Tensor:
        return varlen_attention(q, k, v, metadata, self.scale if scale is None else scale)
