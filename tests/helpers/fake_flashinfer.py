"""A CPU stand-in for the two flashinfer wrappers fornax uses, following FlashInfer's documented
contract, so the backend's planning and the graph buffers can be checked without a GPU.

Paged layout: request i owns pages `indices[indptr[i]:indptr[i+1]]` of the NHD cache
[num_pages, 2, page_size, Hkv, D]; its last page holds `last_page_len[i]` tokens. Prefill queries
`qo_indptr[i]:qo_indptr[i+1]` are the request's last tokens (causal mask aligned to the end of its
context). In CUDA-graph mode a decode wrapper runs from its fixed buffers (what a captured kernel
reads), which `plan` fills, and checks the batch size is fixed.
"""

from __future__ import annotations

import types

import torch

__version__ = "0.0-fake"


def _as_cpu_int32(t: torch.Tensor, what: str) -> torch.Tensor:
    assert t.dtype == torch.int32, f"{what} must be int32, got {t.dtype}"
    return t.cpu()


class _Paged:
    def __init__(self, workspace: torch.Tensor, kv_layout: str = "NHD", *, backend: str = "auto",
                 **kwargs) -> None:
        assert kv_layout == "NHD" and workspace.dtype == torch.uint8
        self.backend = backend
        self.planned = None
        self.num_plans = 0

    def _plan_common(self, qo_indptr, indptr, indices, last, num_qo_heads, num_kv_heads,
                     head_dim, page_size, kwargs) -> None:
        assert num_qo_heads % num_kv_heads == 0
        assert kwargs.get("pos_encoding_mode", "NONE") == "NONE"
        self.planned = types.SimpleNamespace(
            qo_indptr=qo_indptr, indptr=indptr, indices=indices, last=last, heads=num_qo_heads,
            kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size,
            causal=kwargs.get("causal", False), scale=kwargs.get("sm_scale") or head_dim**-0.5,
            q_dtype=kwargs.get("q_data_type"))
        self.num_plans += 1

    def _layout(self):
        p = self.planned
        return p.qo_indptr, p.indptr, p.indices, p.last

    def run(self, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        p = self.planned
        assert p is not None, "run before plan"
        qo_indptr, indptr, indices, last = self._layout()
        assert q.shape[0] == int(qo_indptr[-1]), (q.shape, qo_indptr)
        assert q.shape[1:] == (p.heads, p.head_dim) and q.is_contiguous()
        assert q.dtype == p.q_dtype, (q.dtype, p.q_dtype)
        assert kv_cache.shape[2] == p.page_size
        out = torch.empty_like(q)
        group = p.heads // p.kv_heads
        for i in range(len(last)):
            pages = indices[int(indptr[i]):int(indptr[i + 1])].long()
            kv_len = (len(pages) - 1) * p.page_size + int(last[i])
            keys = kv_cache[pages, 0].reshape(-1, p.kv_heads, p.head_dim)[:kv_len].float()
            values = kv_cache[pages, 1].reshape(-1, p.kv_heads, p.head_dim)[:kv_len].float()
            start, end = int(qo_indptr[i]), int(qo_indptr[i + 1])
            query = q[start:end].float()
            keys = keys.repeat_interleave(group, 1)
            values = values.repeat_interleave(group, 1)
            scores = torch.einsum("qhd,khd->hqk", query, keys) * p.scale
            if p.causal:
                q_pos = torch.arange(kv_len - (end - start), kv_len)[:, None]
                scores = scores.masked_fill(torch.arange(kv_len)[None, :] > q_pos, float("-inf"))
            out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype)
        return out


class BatchPrefillWithPagedKVCacheWrapper(_Paged):
    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
             num_qo_heads, num_kv_heads, head_dim_qk, page_size, **kwargs) -> None:
        self._plan_common(_as_cpu_int32(qo_indptr, "qo_indptr"),
                          _as_cpu_int32(paged_kv_indptr, "indptr"),
                          _as_cpu_int32(paged_kv_indices, "indices"),
                          _as_cpu_int32(paged_kv_last_page_len, "last_page_len"),
                          num_qo_heads, num_kv_heads, head_dim_qk, page_size, kwargs)


class BatchDecodeWithPagedKVCacheWrapper(_Paged):
    def __init__(self, workspace, kv_layout="NHD", use_cuda_graph=False, use_tensor_cores=False,
                 paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None,
                 paged_kv_last_page_len_buffer=None, backend="auto", **kwargs) -> None:
        super().__init__(workspace, kv_layout, backend=backend)
        self.use_cuda_graph = use_cuda_graph
        self.use_tensor_cores = use_tensor_cores
        if use_cuda_graph:
            assert len(paged_kv_indptr_buffer) == len(paged_kv_last_page_len_buffer) + 1
            self.bufs = (paged_kv_indptr_buffer, paged_kv_indices_buffer,
                         paged_kv_last_page_len_buffer)

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim,
             page_size, **kwargs) -> None:
        indptr = _as_cpu_int32(indptr, "indptr")
        indices = _as_cpu_int32(indices, "indices")
        last_page_len = _as_cpu_int32(last_page_len, "last_page_len")
        batch = len(last_page_len)
        if self.use_cuda_graph:
            buf_indptr, buf_indices, buf_last = self.bufs
            assert batch == len(buf_last), "the batch size is fixed in cudagraph mode"
            assert len(indices) <= len(buf_indices)
            buf_indptr.copy_(indptr)
            buf_last.copy_(last_page_len)
            buf_indices[:len(indices)].copy_(indices)
        self._plan_common(torch.arange(batch + 1, dtype=torch.int32), indptr, indices,
                          last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
                          kwargs)

    def _layout(self):
        if not self.use_cuda_graph:
            return super()._layout()
        indptr, indices, last = self.bufs  # what a captured kernel reads
        return self.planned.qo_indptr, indptr, indices, last
