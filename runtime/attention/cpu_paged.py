"""cpu_paged: the CPU backend; decodes read the paged KV cache in place through a C kernel."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fornax.runtime.attention.backend import CommonAttentionMetadata
from fornax.runtime.attention.native_kernels import load_paged_decode
from fornax.runtime.attention.torch_ref import TorchRefBackend, TorchRefMetadata

_KERNEL_DTYPES = {torch.bfloat16: 1, torch.float32: 0}


@dataclass
class CpuPagedMetadata(TorchRefMetadata):
    decode_block_table: np.ndarray | None = None  # [Bd, max_blocks] int32, C-contiguous
    decode_seq_lens: np.ndarray | None = None  # [Bd] int32
    all_decode: bool = False  # every token of the step is a decode: no gather/scatter of q


class CpuPagedBackend(TorchRefBackend):
    """Like torch_ref, but without gathering each decode's whole context out of the cache.

    torch_ref copies every decode's K/V rows into a padded tensor per layer and step (most of its
    time); this backend hands the block table to `csrc/paged_decode_cpu.c`, which walks the
    blocks in place. Prefills keep torch's SDPA (matrix kernels beat a per-token loop there).
    """

    name = "cpu_paged"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if (self.head_dim > 256 or self.num_heads % self.num_kv_heads
                or self.num_heads // self.num_kv_heads > 32):
            raise RuntimeError("cpu_paged needs head_dim <= 256 and at most 32 query heads "
                               "per kv head")
        self._lib = load_paged_decode()
        if self._lib is None:
            raise RuntimeError("the native CPU attention kernel could not be built")
        if self.dtype not in _KERNEL_DTYPES:
            raise RuntimeError(f"cpu_paged supports bfloat16 and float32, not {self.dtype}")

    def build_metadata(self, common: CommonAttentionMetadata) -> CpuPagedMetadata:
        bs = self.block_size
        slots = common.slot_mapping
        meta = CpuPagedMetadata((slots // bs) * (2 * bs) + slots % bs, None, None, None)
        q_lens = np.diff(common.query_start_loc_np)
        dec_rows = np.nonzero(q_lens == 1)[0]
        if len(dec_rows):
            seq_lens = common.seq_lens_np[dec_rows].astype(np.int32)
            num_blocks = -(-int(seq_lens.max()) // bs)
            meta.decode_seq_lens = np.ascontiguousarray(seq_lens)
            meta.decode_block_table = np.ascontiguousarray(
                common.block_table_np[dec_rows, :num_blocks], dtype=np.int32)
            meta.all_decode = len(dec_rows) == common.num_actual_tokens
            if not meta.all_decode:
                qsl = common.query_start_loc_np
                meta.decode_token_index = torch.from_numpy(qsl[dec_rows].astype(np.int64))
        self._prefill_metadata(common, np.nonzero(q_lens > 1)[0], meta)
        return meta

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, metadata: CpuPagedMetadata,
                out: torch.Tensor, scale: float) -> None:
        if metadata.decode_seq_lens is None:
            return
        num = len(metadata.decode_seq_lens)
        if metadata.all_decode:
            query, result = q[:num].contiguous(), out[:num]
        else:
            query = q[metadata.decode_token_index].contiguous()
            result = torch.empty_like(query)
        query = query.to(kv_cache.dtype)
        if result.dtype != kv_cache.dtype or not result.is_contiguous():
            target, result = result, torch.empty_like(query)
        else:
            target = None
        table = metadata.decode_block_table
        status = self._lib.fornax_paged_decode(
            query.data_ptr(), kv_cache.data_ptr(), table.ctypes.data, table.shape[1],
            metadata.decode_seq_lens.ctypes.data, result.data_ptr(), num, self.num_heads,
            self.num_kv_heads, self.head_dim, self.block_size, float(scale),
            _KERNEL_DTYPES[kv_cache.dtype], torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"paged decode kernel refused shape heads={self.num_heads}/"
                               f"{self.num_kv_heads} head_dim={self.head_dim}")
        if target is not None:
            target.copy_(result)
            result = target
        if not metadata.all_decode:
            out[metadata.decode_token_index] = result.to(out.dtype)
