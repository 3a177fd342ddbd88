"""torch_ref: pure-torch attention over the paged KV layout; the CPU path and the test reference."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fornax.runtime.attention.backend import AttentionBackend, CommonAttentionMetadata


@dataclass
class _Prefill:
    token_start: int
    token_end: int
    ctx_index: torch.Tensor | None  # [L] flat K row indices of the whole context; None = no prior KV
    mask: torch.Tensor | None  # [Q, L] bool, True = may attend


@dataclass
class TorchRefMetadata:
    k_slots: torch.Tensor  # [T] flat K row index of each new token (V is + block_size)
    decode_token_index: torch.Tensor | None  # [Bd] token positions of single-token requests
    decode_ctx_index: torch.Tensor | None  # [Bd, max_L] flat K row indices (padded)
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, max_L] bool
    prefills: list[_Prefill] = field(default_factory=list)


class TorchRefBackend(AttentionBackend):
    """Decodes batched in one padded SDPA call; each multi-token request in its own call."""

    name = "torch_ref"

    def _ctx_rows(self, block_table_np: np.ndarray, rows: np.ndarray, length: int) -> np.ndarray:
        """Flat K row indices of positions [0, length) for the given requests -> [R, length]."""
        bs = self.block_size
        pos = np.arange(length)
        blocks = block_table_np[rows][:, pos // bs]
        return blocks.astype(np.int64) * (2 * bs) + (pos % bs)

    def build_metadata(self, common: CommonAttentionMetadata) -> TorchRefMetadata:
        bs = self.block_size
        slots = common.slot_mapping
        k_slots = (slots // bs) * (2 * bs) + slots % bs
        q_lens = np.diff(common.query_start_loc_np)
        meta = TorchRefMetadata(k_slots, None, None, None)
        dec_rows = np.nonzero(q_lens == 1)[0]
        if len(dec_rows):
            self._decode_metadata(common, dec_rows, meta)
        self._prefill_metadata(common, np.nonzero(q_lens > 1)[0], meta)
        return meta

    def _decode_metadata(self, common: CommonAttentionMetadata, dec_rows: np.ndarray,
                         meta: TorchRefMetadata) -> None:
        """Padded flat K row indices of every decode's context, and the padding mask."""
        qsl, seq_lens, dev = common.query_start_loc_np, common.seq_lens_np, meta.k_slots.device
        max_len = int(seq_lens[dec_rows].max())
        ctx = self._ctx_rows(common.block_table_np, dec_rows, max_len)
        valid = np.arange(max_len)[None, :] < seq_lens[dec_rows][:, None]
        ctx = np.where(valid, ctx, 0)
        meta.decode_token_index = torch.from_numpy(qsl[dec_rows].astype(np.int64)).to(dev)
        meta.decode_ctx_index = torch.from_numpy(ctx).to(dev)
        meta.decode_mask = torch.from_numpy(valid[:, None, None, :]).to(dev)

    def _prefill_metadata(self, common: CommonAttentionMetadata, rows: np.ndarray,
                          meta: TorchRefMetadata) -> None:
        """Multi-token requests: the context rows and causal mask of those with prior KV."""
        qsl, seq_lens, dev = common.query_start_loc_np, common.seq_lens_np, meta.k_slots.device
        for row in rows:
            start, end, length = int(qsl[row]), int(qsl[row + 1]), int(seq_lens[row])
            q_len = end - start
            if length == q_len:
                meta.prefills.append(_Prefill(start, end, None, None))
                continue
            ctx = self._ctx_rows(common.block_table_np, np.array([row]), length)[0]
            q_pos = np.arange(length - q_len, length)
            mask = np.arange(length)[None, :] <= q_pos[:, None]
            meta.prefills.append(_Prefill(start, end, torch.from_numpy(ctx).to(dev),
                                          torch.from_numpy(mask).to(dev)))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: TorchRefMetadata, scale: float | None = None) -> torch.Tensor:
        scale = self.scale if scale is None else scale
        flat = kv_cache.view(-1, self.num_kv_heads, self.head_dim)  # [num_blocks*2*bs, Hkv, D]
        num_tokens = metadata.k_slots.shape[0]
        flat.index_copy_(0, metadata.k_slots, k[:num_tokens].to(flat.dtype))
        flat.index_copy_(0, metadata.k_slots + self.block_size, v[:num_tokens].to(flat.dtype))
        out = torch.empty_like(q)
        self._decode(q, kv_cache, metadata, out, scale)
        self._prefill(q, k, v, flat, metadata, out, scale)
        return out

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, metadata: TorchRefMetadata,
                out: torch.Tensor, scale: float) -> None:
        """Single-token requests, batched in one padded SDPA over gathered contexts."""
        idx = metadata.decode_ctx_index
        if metadata.decode_token_index is None or idx is None:
            return
        flat = kv_cache.view(-1, self.num_kv_heads, self.head_dim)
        keys = flat[idx].transpose(1, 2)  # [Bd, Hkv, max_L, D]
        values = flat[idx + self.block_size].transpose(1, 2)
        query = q[metadata.decode_token_index].unsqueeze(2)  # [Bd, Hq, 1, D]
        res = F.scaled_dot_product_attention(query, keys.to(q.dtype), values.to(q.dtype),
                                             attn_mask=metadata.decode_mask, scale=scale,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        out[metadata.decode_token_index] = res.squeeze(2)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flat: torch.Tensor,
                 metadata: TorchRefMetadata, out: torch.Tensor, scale: float) -> None:
        """Each multi-token request in its own SDPA call (causal; masked when it has prior KV)."""
        gqa = self.num_heads != self.num_kv_heads
        for pf in metadata.prefills:
            query = q[pf.token_start:pf.token_end].transpose(0, 1).unsqueeze(0)  # [1, Hq, Q, D]
            if pf.ctx_index is None:
                keys = k[pf.token_start:pf.token_end].transpose(0, 1).unsqueeze(0)
                values = v[pf.token_start:pf.token_end].transpose(0, 1).unsqueeze(0)
                res = F.scaled_dot_product_attention(query, keys, values, is_causal=True,
                                                     scale=scale, enable_gqa=gqa)
            else:
                keys = flat[pf.ctx_index].transpose(0, 1).unsqueeze(0).to(q.dtype)
                values = flat[pf.ctx_index + self.block_size].transpose(0, 1).unsqueeze(0)
                res = F.scaled_dot_product_attention(query, keys, values.to(q.dtype),
                                                     attn_mask=pf.mask, scale=scale,
                                                     enable_gqa=gqa)
            out[pf.token_start:pf.token_end] = res.squeeze(0).transpose(0, 1)
