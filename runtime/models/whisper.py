"""Whisper encoder-decoder: batched encoder, paged decoder self-attention, per-request cross K/V (engine core).

The encoder turns log-mel windows [N, mels, 3000] into [N, 1500, d]; `write_cross_kv` projects that
once per request into the runner's cross-attention store (one slot per running request). Decoder
steps are flat varlen batches like any causal LM: self-attention goes through the paged KV cache
and the attention backend, cross-attention reads the request's slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from fornax.runtime.attention.backend import AttentionBackend
from fornax.runtime.errors import ConfigError
from fornax.runtime.loaders.weights import Place, Renames, rename
from fornax.runtime.models.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)


@dataclass(frozen=True)
class WhisperSpec:
    """The shape of a Whisper model, read from an HF config.json."""

    vocab_size: int
    num_mel_bins: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> WhisperSpec:
        try:
            return cls(
                vocab_size=int(cfg["vocab_size"]), num_mel_bins=int(cfg.get("num_mel_bins", 80)),
                d_model=int(cfg["d_model"]), encoder_layers=int(cfg["encoder_layers"]),
                decoder_layers=int(cfg["decoder_layers"]),
                encoder_heads=int(cfg["encoder_attention_heads"]),
                decoder_heads=int(cfg["decoder_attention_heads"]),
                encoder_ffn_dim=int(cfg["encoder_ffn_dim"]),
                decoder_ffn_dim=int(cfg["decoder_ffn_dim"]),
                max_source_positions=int(cfg.get("max_source_positions", 1500)),
                max_target_positions=int(cfg.get("max_target_positions", 448)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"Whisper config.json is missing or has a bad value for {exc}") from exc

    @property
    def num_frames(self) -> int:
        """Mel frames of one encoder window (the convolution halves them)."""
        return 2 * self.max_source_positions

    @property
    def head_dim(self) -> int:
        return self.d_model // self.decoder_heads


@dataclass
class CrossAttentionMetadata:
    """Which cross-attention slot each query token of the flat decoder batch reads."""

    decode_token_index: torch.Tensor | None = None  # [Bd] flat positions of 1-token requests
    decode_slots: torch.Tensor | slice | None = None  # their slots (a slice when contiguous)
    prefills: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, slot)
    # alignment capture (word timestamps): flat token positions and the layer/head pairs to keep
    align_token_index: torch.Tensor | None = None  # [A]
    align_slots: torch.Tensor | None = None  # [A]
    align_heads: dict[int, list[int]] = field(default_factory=dict)  # layer -> heads
    align_out: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [A, h, T] weights


class _MLP(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(d_model, ffn_dim, bias=True)
        self.fc2 = RowParallelLinear(ffn_dim, d_model, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, spec: WhisperSpec) -> None:
        super().__init__()
        d, heads = spec.d_model, spec.encoder_heads
        self.num_heads, self.head_dim = heads, d // heads
        self.qkv_proj = QKVParallelLinear(d, d // heads, heads, heads, bias=True)  # K bias stays 0
        self.out_proj = RowParallelLinear(d, d, bias=True)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.mlp = _MLP(d, spec.encoder_ffn_dim)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, T, d]
        n, t, d = x.shape
        qkv = self.qkv_proj(self.self_attn_layer_norm(x))
        q, k, v = (part.view(n, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for part in qkv.split(d, dim=-1))
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.out_proj(attn.transpose(1, 2).reshape(n, t, d))
        return x + self.mlp(self.final_layer_norm(x))


class WhisperEncoder(nn.Module):
    def __init__(self, spec: WhisperSpec) -> None:
        super().__init__()
        d = spec.d_model
        self.conv1 = nn.Conv1d(spec.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Parameter(torch.empty(spec.max_source_positions, d))
        self.layers = nn.ModuleList(EncoderLayer(spec) for _ in range(spec.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [N, mels, frames] -> [N, T, d]
        x = F.gelu(self.conv1(features))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.embed_positions[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class DecoderLayer(nn.Module):
    def __init__(self, spec: WhisperSpec, backend: AttentionBackend, index: int) -> None:
        super().__init__()
        d, heads = spec.d_model, spec.decoder_heads
        self.index, self.num_heads, self.head_dim = index, heads, d // heads
        self.backend = backend
        self.qkv_proj = QKVParallelLinear(d, self.head_dim, heads, heads, bias=True)
        self.out_proj = RowParallelLinear(d, d, bias=True)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.cross_q_proj = ColumnParallelLinear(d, d, bias=True)
        self.cross_kv_proj = MergedColumnParallelLinear(d, [d, d], bias=True)  # K bias stays 0
        self.cross_out_proj = RowParallelLinear(d, d, bias=True)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.mlp = _MLP(d, spec.decoder_ffn_dim)
        self.final_layer_norm = nn.LayerNorm(d)

    def cross_kv(self, enc: torch.Tensor) -> torch.Tensor:
        """[N, T, d] encoder states -> [N, 2, H, T, Dh] cross-attention keys and values."""
        n, t, _ = enc.shape
        kv = self.cross_kv_proj(enc).view(n, t, 2, self.num_heads, self.head_dim)
        return kv.permute(0, 2, 3, 1, 4)

    def _cross_attention(self, q: torch.Tensor, store: torch.Tensor,
                         meta: CrossAttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)  # q: [T, H, Dh]; store: [slots, 2, H, T_enc, Dh]
        if meta.decode_token_index is not None:
            kv = store[meta.decode_slots]
            query = q[meta.decode_token_index].unsqueeze(2)  # [Bd, H, 1, Dh]
            res = F.scaled_dot_product_attention(query, kv[:, 0], kv[:, 1])
            out[meta.decode_token_index] = res.squeeze(2)
        for start, end, slot in meta.prefills:
            query = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, Q, Dh]
            kv = store[slot]
            res = F.scaled_dot_product_attention(query, kv[0].unsqueeze(0), kv[1].unsqueeze(0))
            out[start:end] = res.squeeze(0).transpose(0, 1)
        heads = meta.align_heads.get(self.index)
        if heads and meta.align_token_index is not None:
            keys = store[meta.align_slots, 0][:, heads]  # [A, h, T_enc, Dh]
            query = q[meta.align_token_index][:, heads].unsqueeze(2)  # [A, h, 1, Dh]
            scores = (query @ keys.transpose(-1, -2)).squeeze(2) * self.head_dim**-0.5
            meta.align_out[self.index] = scores.float().softmax(dim=-1)
        return out

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: Any, cross_store: torch.Tensor,
                cross_meta: CrossAttentionMetadata) -> torch.Tensor:
        d = self.num_heads * self.head_dim
        q, k, v = self.qkv_proj(self.self_attn_layer_norm(x)).split(d, dim=-1)
        shape = (-1, self.num_heads, self.head_dim)
        attn = self.backend.forward(q.view(shape), k.view(shape), v.view(shape), kv_cache,
                                    attn_metadata)
        x = x + self.out_proj(attn.reshape(-1, d))
        cq = self.cross_q_proj(self.encoder_attn_layer_norm(x)).view(shape)
        x = x + self.cross_out_proj(self._cross_attention(cq, cross_store, cross_meta)
                                    .reshape(-1, d))
        return x + self.mlp(self.final_layer_norm(x))


class WhisperDecoder(nn.Module):
    def __init__(self, spec: WhisperSpec, backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.d_model)
        self.embed_positions = nn.Parameter(torch.empty(spec.max_target_positions, spec.d_model))
        self.layers = nn.ModuleList(DecoderLayer(spec, backend, i)
                                    for i in range(spec.decoder_layers))
        self.layer_norm = nn.LayerNorm(spec.d_model)


# HF name fragment -> (our name fragment, shard id); applied to the first match only
_RENAMES: Renames = (
    (".self_attn.q_proj.", ".qkv_proj.", "q"),
    (".self_attn.k_proj.", ".qkv_proj.", "k"),
    (".self_attn.v_proj.", ".qkv_proj.", "v"),
    (".self_attn.out_proj.", ".out_proj.", None),
    (".encoder_attn.q_proj.", ".cross_q_proj.", None),
    (".encoder_attn.k_proj.", ".cross_kv_proj.", 0),
    (".encoder_attn.v_proj.", ".cross_kv_proj.", 1),
    (".encoder_attn.out_proj.", ".cross_out_proj.", None),
    (".fc1.", ".mlp.fc1.", None),
    (".fc2.", ".mlp.fc2.", None),
)


class WhisperForConditionalGeneration(nn.Module):
    """Encoder, decoder and the tied output projection; HF checkpoint names load as they are."""

    def __init__(self, hf_config: dict[str, Any], arch: str, backend: AttentionBackend) -> None:
        super().__init__()
        self.spec = WhisperSpec.from_hf(hf_config)
        self.encoder = WhisperEncoder(self.spec)
        self.decoder = WhisperDecoder(self.spec, backend)
        self.proj_out = ParallelLMHead(self.spec.vocab_size, self.spec.d_model)
        self.proj_out.tie_to(self.decoder.embed_tokens)  # packed once on bf16 CPU, like any head

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """[N, mels, frames] log-mel windows -> [N, T_enc, d] encoder states."""
        return self.encoder(features)

    def write_cross_kv(self, enc: torch.Tensor, rows: torch.Tensor,
                       stores: list[torch.Tensor]) -> None:
        """Project encoder states once into each decoder layer's store at the given slots."""
        for layer, store in zip(self.decoder.layers, stores):
            store[rows] = cast(DecoderLayer, layer).cross_kv(enc).to(store.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn_metadata: Any,
                cross_stores: list[torch.Tensor], cross_meta: CrossAttentionMetadata
                ) -> torch.Tensor:
        dec = self.decoder
        x = dec.embed_tokens(input_ids) + dec.embed_positions[positions]
        for layer, kv_cache, store in zip(dec.layers, kv_caches, cross_stores):
            x = layer(positions, x, kv_cache, attn_metadata, store, cross_meta)
        return dec.layer_norm(x)

    logits_threads = 0  # >0: threads for the vocabulary projection (the runner's small steps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        threads = torch.get_num_threads()
        if self.logits_threads <= threads:
            return self.proj_out.compute_logits(hidden)
        torch.set_num_threads(self.logits_threads)  # 20-40 MB of weights: worth every thread
        try:
            return self.proj_out.compute_logits(hidden)
        finally:
            torch.set_num_threads(threads)

    def checkpoint_name(self, name: str) -> Place | None:
        """An HF checkpoint tensor's parameter and shard (None: not loaded; see loaders.weights)."""
        if name == "proj_out.weight":
            return None  # tied to the token embedding
        name = name.removeprefix("model.")
        if name.endswith("embed_positions.weight"):
            name = name.removesuffix(".weight")
        return rename(name, _RENAMES)
