"""Llama-family decoder (Llama 2/3, Mistral, SmolLM, Qwen2 biases, Qwen3 q/k norm) (engine core)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fornax.runtime.attention.backend import AttentionBackend
from fornax.runtime.errors import ConfigError
from fornax.runtime.loaders.model_files import config_context_length
from fornax.runtime.loaders.weights import STACKED_DECODER, Place, rename
from fornax.runtime.models.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
)
from fornax.runtime.models.rotary import RotaryEmbedding, rope_parameters


@dataclass(frozen=True)
class DecoderSpec:
    """The shape of a Llama-family decoder, read from an HF config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any]
    partial_rotary_factor: float
    max_position: int
    tie_word_embeddings: bool
    attention_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], arch: str) -> DecoderSpec:
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            theta, scaling = rope_parameters(cfg)
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                partial_rotary_factor=float(cfg.get("partial_rotary_factor", 1.0)),
                max_position=config_context_length(cfg),  # the rotary tables cover max_model_len
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", arch.startswith("Qwen2"))),
                o_proj_bias=bool(cfg.get("attention_bias", False)) and not arch.startswith("Qwen2"),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                qk_norm=arch.startswith("Qwen3"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"config.json is missing or has a bad value for {exc}") from exc


class DecoderAttention(nn.Module):
    def __init__(self, spec: DecoderSpec, backend: AttentionBackend, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            spec.num_heads, spec.num_kv_heads, spec.head_dim)
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads,
                                          spec.num_kv_heads, bias=spec.attention_bias)
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size,
                                        bias=spec.o_proj_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
        self.qk_norm = spec.qk_norm
        self.rotary = rotary
        self.backend = backend

    def qkv(self, positions: torch.Tensor, x: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projections, q/k norm and rotary: q [T, Hq, D], k and v [T, Hkv, D]."""
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return q, k, v


class DecoderMLP(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            spec.hidden_size, [spec.intermediate_size] * 2, bias=spec.mlp_bias)
        self.down_proj = RowParallelLinear(spec.intermediate_size, spec.hidden_size,
                                           bias=spec.mlp_bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, backend: AttentionBackend, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(spec, backend, rotary)
        self.mlp = DecoderMLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: Any) -> torch.Tensor:
        q, k, v = self.attention_inputs(positions, x)
        attn = self.self_attn.backend.forward(q, k, v, kv_cache, attn_metadata)
        return self.after_attention(x, attn)

    # The two halves around attention: graphs/ compiles each as one fused piece.
    def attention_inputs(self, positions: torch.Tensor, x: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.self_attn.qkv(positions, self.input_layernorm(x))

    def after_attention(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        attn_dim = self.self_attn.num_heads * self.self_attn.head_dim
        x = x + self.self_attn.o_proj(attn.reshape(-1, attn_dim))
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, spec: DecoderSpec, backend: AttentionBackend) -> None:
        super().__init__()
        rotary = RotaryEmbedding(spec.head_dim, spec.max_position, spec.rope_theta,
                                 spec.rope_scaling, spec.partial_rotary_factor)
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, backend, rotary)
                                    for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.fused_decode: Any = None  # kernels/fused_decode.FusedDecode: layers in one C call

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn_metadata: Any) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        fused = self.fused_decode
        if fused is not None and fused.covers(x, attn_metadata):
            return self.norm(fused.run(x, positions, kv_caches, attn_metadata))
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(positions, x, kv_cache, attn_metadata)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Causal LM over the paged KV cache: forward gives hidden states, compute_logits the logits."""

    def __init__(self, hf_config: dict[str, Any], arch: str, backend: AttentionBackend) -> None:
        super().__init__()
        self.spec = DecoderSpec.from_hf(hf_config, arch)
        self.model = DecoderModel(self.spec, backend)
        self.lm_head = ParallelLMHead(self.spec.vocab_size, self.spec.hidden_size)
        if self.spec.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn_metadata: Any) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def checkpoint_name(self, name: str) -> Place | None:
        """An HF checkpoint tensor's parameter and shard (None: not loaded; see loaders.weights)."""
        if "rotary_emb.inv_freq" in name:
            return None
        if name == "lm_head.weight" and self.spec.tie_word_embeddings:
            return None
        return rename(name, STACKED_DECODER)
