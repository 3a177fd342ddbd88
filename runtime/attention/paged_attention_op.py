"""`fornax::paged_attention`: a paged-KV attention call as one opaque torch.library op (engine core).

torch.compile sees the op through its fake implementation (output shaped like `q`), so a compiled
region that contains attention holds `fullgraph=True` whatever the kernel behind it (FlashInfer's
JIT-built CUDA kernels, or a CPU implementation in tests). The op writes the new K/V into
`kv_cache` (declared mutated) and returns a fresh tensor, so it never aliases an input.

Which kernels run is the backend's business: the op carries an integer handle naming a registered
backend, and the backend's `attend(q, k, v, kv_cache, slot_mapping)` uses the attention plan it made
for this step (FlashInfer's `plan` runs once per step, before the forward, outside any graph).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Protocol

import torch


class PagedAttentionImpl(Protocol):
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
               slot_mapping: torch.Tensor) -> torch.Tensor: ...


# Weak: a backend lives as long as its model holds it; its workspace must not outlive it.
_IMPLS: weakref.WeakValueDictionary[int, PagedAttentionImpl] = weakref.WeakValueDictionary()
_NEXT = itertools.count(1)


def register_impl(impl: PagedAttentionImpl) -> int:
    """Make `impl` reachable from the op (while the caller keeps it alive); returns the handle
    to pass as `handle`."""
    handle = next(_NEXT)
    _IMPLS[handle] = impl
    return handle


def unregister_impl(handle: int) -> None:
    _IMPLS.pop(handle, None)


@torch.library.custom_op("fornax::paged_attention", mutates_args=("kv_cache",))
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, handle: int) -> torch.Tensor:
    """q: [T, Hq, D], k/v: [T, Hkv, D], kv_cache: [num_blocks, 2, block_size, Hkv, D],
    slot_mapping: [T] int64 flat slots of the new tokens -> [T, Hq, D]."""
    impl = _IMPLS.get(handle)
    if impl is None:
        raise RuntimeError(f"fornax::paged_attention: no backend registered as handle {handle}")
    return impl.attend(q, k, v, kv_cache, slot_mapping)


@paged_attention.register_fake
def _paged_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                          handle: int) -> torch.Tensor:
    return torch.empty_like(q)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store each new token's K and V at its flat slot of the NHD paged cache
    [num_blocks, 2, block_size, Hkv, D]; shapes stay fixed, so it is CUDA-graph safe."""
    block_size = kv_cache.shape[2]
    num_tokens = slot_mapping.shape[0]
    blocks = torch.div(slot_mapping, block_size, rounding_mode="floor")
    offsets = slot_mapping - blocks * block_size
    kv_cache[:, 0].index_put_((blocks, offsets), k[:num_tokens].to(kv_cache.dtype))
    kv_cache[:, 1].index_put_((blocks, offsets), v[:num_tokens].to(kv_cache.dtype))
