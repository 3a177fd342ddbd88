"""cpu_paged: the CPU backend; decodes read the paged KV cache in place through a C kernel."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fornax.runtime.attention.backend import CommonAttentionMetadata
from fornax.runtime.attention.torch_ref import TorchRefBackend, TorchRefMetadata
from fornax.runtime.kernels.build import load_paged_decode, load_paged_prefill

_KERNEL_DTYPES = {torch.bfloat16: 1, torch.float32: 0}
# A mixed step (prompt chunks beside decodes) of at most this many tokens also gets one
# decode-kernel row per token (kernels/fused_decode.py runs such steps in one C call)
TOKEN_ROWS_MAX = 64


@dataclass
class CpuPagedMetadata(TorchRefMetadata):
    decode_block_table: np.ndarray | None = None  # [Bd, max_blocks] int32, C-contiguous
    decode_seq_lens: np.ndarray | None = None  # [Bd] int32
    all_decode: bool = False  # every token of the step is a decode: no gather/scatter of q
    # Multi-token requests for the prefill kernel (None: they take torch's SDPA instead).
    prefill_block_table: np.ndarray | None = None  # [P, max_blocks] int32
    prefill_q_starts: np.ndarray | None = None  # [P] int32 first token of each in the batch
    prefill_q_lens: np.ndarray | None = None  # [P] int32
    prefill_seq_lens: np.ndarray | None = None  # [P] int32 context length after this step
    # Small mixed steps: every token as a decode-kernel row of its request (its context ends
    # at the token itself, so attention over the cache is causal); None otherwise.
    token_block_table: np.ndarray | None = None  # [T, max_blocks] int32, C-contiguous
    token_seq_lens: np.ndarray | None = None  # [T] int32


class CpuPagedBackend(TorchRefBackend):
    """Like torch_ref, but without gathering each decode's whole context out of the cache.

    torch_ref copies every decode's K/V rows into a padded tensor per layer and step (most of its
    time); this backend hands the block table to `csrc/paged_decode_cpu.c`, which walks the
    blocks in place. Multi-token requests go to `csrc/paged_prefill_cpu.c` (bf16 with
    AVX512-BF16: both products on the bf16 dot-product instruction, keys read from the cache in
    place, no mask tensors); other dtypes and CPUs keep torch's SDPA.
    """

    name = "cpu_paged"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if (self.head_dim > 256 or self.num_heads % self.num_kv_heads
                or self.num_heads // self.num_kv_heads > 32):
            raise RuntimeError("cpu_paged needs head_dim <= 256 and at most 32 query heads "
                               "per kv head")
        lib = load_paged_decode()
        if lib is None:
            raise RuntimeError("the native CPU attention kernel could not be built")
        self._lib = lib
        if self.dtype not in _KERNEL_DTYPES:
            raise RuntimeError(f"cpu_paged supports bfloat16 and float32, not {self.dtype}")
        self._prefill_lib = None
        if self.dtype == torch.bfloat16 and self.head_dim % 32 == 0:
            self._prefill_lib = load_paged_prefill()

    @property
    def has_prefill_kernel(self) -> bool:
        """Whether multi-token requests take csrc/paged_prefill_cpu.c (else torch's SDPA)."""
        return self._prefill_lib is not None

    def build_metadata(self, common: CommonAttentionMetadata) -> CpuPagedMetadata:
        bs = self.block_size
        slots = common.slot_mapping
        meta = CpuPagedMetadata((slots // bs) * (2 * bs) + slots % bs, None, None, None)
        q_lens = np.diff(common.query_start_loc_np)
        dec_rows = np.nonzero(q_lens == 1)[0]
        if len(dec_rows):
            meta.decode_seq_lens, meta.decode_block_table = self._kernel_rows(common, dec_rows)
            meta.all_decode = len(dec_rows) == common.num_actual_tokens
            if not meta.all_decode:
                qsl = common.query_start_loc_np
                meta.decode_token_index = torch.from_numpy(qsl[dec_rows].astype(np.int64))
        prefill_rows = np.nonzero(q_lens > 1)[0]
        if len(prefill_rows) and common.num_actual_tokens <= TOKEN_ROWS_MAX:
            meta.token_seq_lens, meta.token_block_table = self._token_rows(common, q_lens)
        if self._prefill_lib is None:
            self._prefill_metadata(common, prefill_rows, meta)
        elif len(prefill_rows):
            meta.prefill_seq_lens, meta.prefill_block_table = self._kernel_rows(common,
                                                                                prefill_rows)
            meta.prefill_q_lens = np.ascontiguousarray(q_lens[prefill_rows], dtype=np.int32)
            meta.prefill_q_starts = np.ascontiguousarray(
                common.query_start_loc_np[prefill_rows], dtype=np.int32)
        return meta

    def _kernel_rows(self, common: CommonAttentionMetadata,
                     rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The C kernels' view of some requests: their context lengths and their block-table
        rows cut to the blocks those lengths use, both C-contiguous int32."""
        seq_lens = np.ascontiguousarray(common.seq_lens_np[rows], dtype=np.int32)
        num_blocks = -(-int(seq_lens.max()) // self.block_size)
        return seq_lens, np.ascontiguousarray(common.block_table_np[rows, :num_blocks],
                                              dtype=np.int32)

    def _token_rows(self, common: CommonAttentionMetadata,
                    q_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each token of the step as a decode row: its request's block-table row and the
        context length up to and including the token (C-contiguous int32)."""
        num = int(q_lens.sum())
        owner = np.repeat(np.arange(len(q_lens)), q_lens)
        offset = np.arange(num) - np.repeat(common.query_start_loc_np[:-1], q_lens)
        seq_lens = np.ascontiguousarray(
            np.repeat(common.seq_lens_np[:len(q_lens)] - q_lens, q_lens) + offset + 1,
            dtype=np.int32)
        num_blocks = -(-int(seq_lens.max()) // self.block_size)
        return seq_lens, np.ascontiguousarray(common.block_table_np[owner, :num_blocks],
                                              dtype=np.int32)

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, metadata: TorchRefMetadata,
                out: torch.Tensor, scale: float) -> None:
        assert isinstance(metadata, CpuPagedMetadata)  # made by build_metadata
        seq_lens, table = metadata.decode_seq_lens, metadata.decode_block_table
        if seq_lens is None or table is None:
            return
        num = len(seq_lens)
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
        status = self._lib.fornax_paged_decode(
            query.data_ptr(), kv_cache.data_ptr(), table.ctypes.data, table.shape[1],
            seq_lens.ctypes.data, result.data_ptr(), num, self.num_heads,
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

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flat: torch.Tensor,
                 metadata: TorchRefMetadata, out: torch.Tensor, scale: float) -> None:
        """Every multi-token request in one kernel call over the cache (K/V already written)."""
        assert isinstance(metadata, CpuPagedMetadata)  # made by build_metadata
        lib, table = self._prefill_lib, metadata.prefill_block_table
        starts, lens = metadata.prefill_q_starts, metadata.prefill_q_lens
        seq_lens = metadata.prefill_seq_lens
        if lib is None or table is None or starts is None or lens is None or seq_lens is None:
            super()._prefill(q, k, v, flat, metadata, out, scale)
            return
        d = self.head_dim
        query = q if q.dtype == torch.bfloat16 and q.stride()[1:] == (d, 1) else (
            q.to(torch.bfloat16).contiguous())
        result = out if out.dtype == torch.bfloat16 and out.stride()[1:] == (d, 1) else (
            torch.empty_like(query))
        status = lib.fornax_paged_prefill(
            query.data_ptr(), query.stride(0), flat.data_ptr(), table.ctypes.data, table.shape[1],
            starts.ctypes.data, lens.ctypes.data, seq_lens.ctypes.data, len(table), result.data_ptr(),
            result.stride(0), self.num_heads, self.num_kv_heads, d, self.block_size, float(scale),
            torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"paged prefill kernel refused shape heads={self.num_heads}/"
                               f"{self.num_kv_heads} head_dim={d} (or could not allocate its "
                               f"scratch)")
        if result is not out:
            for start, length in zip(starts, lens):
                out[start:start + length] = result[start:start + length].to(out.dtype)
