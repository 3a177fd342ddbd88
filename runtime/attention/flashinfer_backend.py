"""FlashInfer attention over the paged KV cache: batch prefill/decode wrappers (engine core, GPU).

One step, one plan: `build_metadata` turns the step's block table into FlashInfer's page layout
(indptr / indices / last_page_len, built on the host in NumPy) and calls the right wrapper's
`plan` there, before the forward and outside any CUDA graph. The layers then call
`fornax::paged_attention` (runtime/attention/paged_attention_op.py), which writes the new K/V at
their slots and runs the planned wrapper.

- Steps holding a prefill (any request with more than one new token) use one
  BatchPrefillWithPagedKVCacheWrapper for every token (decode rows are 1-token queries; FlashInfer's
  causal mask is aligned to the end of each request's context).
- Pure-decode steps use BatchDecodeWithPagedKVCacheWrapper, with tensor cores when query heads
  outnumber KV heads (grouped-query attention).
- Each captured CUDA-graph bucket owns a decode wrapper built with `use_cuda_graph=True` over fixed
  indptr / indices / last_page_len buffers; `build_graph_metadata` re-plans it before each replay.

The cache layout is FlashInfer's "NHD" single-tensor form: [num_blocks, 2, block_size, Hkv, D].
flashinfer is imported when the backend is built, never at module import, so CPU machines import
this file fine (its host-side helpers are unit-tested there).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fornax.runtime import env
from fornax.runtime.attention.backend import AttentionBackend, CommonAttentionMetadata
from fornax.runtime.attention.paged_attention_op import register_impl, write_kv

logger = logging.getLogger(__name__)

WORKSPACE_BYTES = 256 * 1024 * 1024  # float split-k scratch, shared by every wrapper
SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class PagedKVLayout:
    """FlashInfer's CSR description of each request's pages (host arrays, int32)."""

    indptr: np.ndarray  # [num_reqs + 1] offsets into indices
    indices: np.ndarray  # [sum of pages] block ids, request after request
    last_page_len: np.ndarray  # [num_reqs] tokens in each request's last page, in [1, block_size]


def paged_kv_layout(block_table_np: np.ndarray, seq_lens_np: np.ndarray,
                    block_size: int) -> PagedKVLayout:
    """Pages covering each request's `seq_len` tokens, from its block-table row."""
    seq_lens = seq_lens_np.astype(np.int64)
    pages = (seq_lens + block_size - 1) // block_size
    indptr = np.zeros(len(seq_lens) + 1, dtype=np.int32)
    np.cumsum(pages, out=indptr[1:])
    width = int(pages.max()) if len(pages) else 0
    if width > block_table_np.shape[1]:
        raise ValueError(f"a request needs {width} pages, the block table holds "
                         f"{block_table_np.shape[1]}")
    used = np.arange(width)[None, :] < pages[:, None]
    indices = block_table_np[:, :width][used].astype(np.int32)
    last = (seq_lens - (pages - 1) * block_size).astype(np.int32)
    return PagedKVLayout(indptr, indices, last)


@dataclass
class FlashInferMetadata:
    """What the layers need this step: where the new tokens' K/V go. The plan lives in the
    wrapper the backend selected in `build_metadata`."""

    slot_mapping: torch.Tensor  # [T] int64
    kind: str  # "prefill" | "decode" | "graph"


def decode_uses_tensor_cores(num_heads: int, num_kv_heads: int) -> bool:
    """Grouped-query heads decode faster on tensor cores (FlashInfer's prefill kernels)."""
    override = env.FLASHINFER_TENSOR_CORES.get()
    if override is not None:
        return override
    return num_heads // num_kv_heads >= 2


class FlashInferBackend(AttentionBackend):
    """Paged attention through FlashInfer; supports CUDA-graph capture per decode bucket."""

    name = "flashinfer"
    supports_cuda_graphs = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, block_size, dtype, device)
        check_supported(head_dim, dtype, device)
        import flashinfer

        self._fi = flashinfer
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.tensor_core_decode = decode_uses_tensor_cores(num_heads, num_kv_heads)
        # fa2 is FlashInfer's portable path (and the quickest to JIT); override to try others.
        self.prefill_backend = env.FLASHINFER_PREFILL_BACKEND.get()
        self.decode_backend = env.FLASHINFER_DECODE_BACKEND.get()
        self.prefill_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend=self.prefill_backend)
        self.decode_wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self.tensor_core_decode,
            backend=self.decode_backend)
        self.graph_wrappers: dict[int, Any] = {}
        self._graph_bufs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._active: Any = None
        self.handle = register_impl(self)
        logger.info("flashinfer %s: prefill %s, decode %s%s", flashinfer.__version__,
                    self.prefill_backend, self.decode_backend,
                    " (tensor cores)" if self.tensor_core_decode else "")

    # ---- planning (host side, once per step) ---------------------------------------------------
    def _plan_kwargs(self) -> dict[str, Any]:
        return {"pos_encoding_mode": "NONE", "q_data_type": self.dtype,
                "kv_data_type": self.dtype, "sm_scale": self.scale}

    def _plan_decode(self, wrapper: Any, layout: PagedKVLayout) -> None:
        wrapper.plan(torch.from_numpy(layout.indptr), torch.from_numpy(layout.indices),
                     torch.from_numpy(layout.last_page_len), self.num_heads, self.num_kv_heads,
                     self.head_dim, self.block_size, **self._plan_kwargs())

    def build_metadata(self, common: CommonAttentionMetadata) -> FlashInferMetadata:
        layout = paged_kv_layout(common.block_table_np, common.seq_lens_np, self.block_size)
        if common.max_query_len == 1:
            self._plan_decode(self.decode_wrapper, layout)
            self._active = self.decode_wrapper
            return FlashInferMetadata(common.slot_mapping, "decode")
        qo_indptr = torch.from_numpy(common.query_start_loc_np.astype(np.int32))
        self.prefill_wrapper.plan(
            qo_indptr, torch.from_numpy(layout.indptr), torch.from_numpy(layout.indices),
            torch.from_numpy(layout.last_page_len), self.num_heads, self.num_kv_heads,
            self.head_dim, self.block_size, causal=True, **self._plan_kwargs())
        self._active = self.prefill_wrapper
        return FlashInferMetadata(common.slot_mapping, "prefill")

    def reserve_graph_buffers(self, max_bucket: int, max_pages: int) -> None:
        """One set of page-table buffers for every bucket (each wrapper plans into a prefix of
        them just before its own replay, and replays run one at a time)."""
        dev = self.device
        self._graph_bufs = (torch.zeros(max_bucket + 1, dtype=torch.int32, device=dev),
                            torch.zeros(max_pages, dtype=torch.int32, device=dev),
                            torch.zeros(max_bucket, dtype=torch.int32, device=dev))

    def graph_wrapper(self, bucket: int) -> Any:
        """The decode wrapper of one captured bucket, over buffers that never move."""
        wrapper = self.graph_wrappers.get(bucket)
        if wrapper is None:
            if self._graph_bufs is None:
                raise RuntimeError("reserve_graph_buffers must run before graph capture")
            indptr, indices, last = self._graph_bufs
            if bucket > len(last):
                raise ValueError(f"bucket {bucket} exceeds the reserved {len(last)} rows")
            wrapper = self._fi.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True,
                use_tensor_cores=self.tensor_core_decode,
                paged_kv_indptr_buffer=indptr[:bucket + 1],
                paged_kv_indices_buffer=indices,
                paged_kv_last_page_len_buffer=last[:bucket],
                backend=self.decode_backend)
            self.graph_wrappers[bucket] = wrapper
        return wrapper

    def build_graph_metadata(self, common: CommonAttentionMetadata,
                             bucket: int) -> FlashInferMetadata:
        """Plan the bucket's own decode wrapper (the batch is already padded to `bucket`)."""
        if common.num_reqs != bucket or common.max_query_len != 1:
            raise ValueError(f"graph metadata wants a pure-decode batch of {bucket}, got "
                             f"{common.num_reqs} requests, max query {common.max_query_len}")
        wrapper = self.graph_wrapper(bucket)
        layout = paged_kv_layout(common.block_table_np, common.seq_lens_np, self.block_size)
        self._plan_decode(wrapper, layout)
        self._active = wrapper
        return FlashInferMetadata(common.slot_mapping, "graph")

    # ---- the layer call ------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: FlashInferMetadata, scale: float | None = None) -> torch.Tensor:
        if scale is not None and scale != self.scale:
            raise ValueError("flashinfer plans one softmax scale per step; layers must agree")
        return torch.ops.fornax.paged_attention(q, k, v, kv_cache, metadata.slot_mapping,
                                                self.handle)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
               slot_mapping: torch.Tensor) -> torch.Tensor:
        """The op's implementation: store the new K/V, then run the wrapper planned this step."""
        if self._active is None:
            raise RuntimeError("flashinfer attention ran before build_metadata planned the step")
        write_kv(kv_cache, k, v, slot_mapping)
        return self._active.run(q.contiguous(), kv_cache)


def check_supported(head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
    """Raise ValueError for what this backend does not serve (the caller may fall back)."""
    if device.type != "cuda":
        raise ValueError("the flashinfer backend needs a CUDA device")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"flashinfer backend: head_dim {head_dim} is not one of "
                         f"{SUPPORTED_HEAD_DIMS}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"flashinfer backend: dtype {dtype} is not float16/bfloat16")
