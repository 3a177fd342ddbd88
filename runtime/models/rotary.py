"""Rotary position embeddings with the HF `rope_scaling` variants, as a cos/sin cache (engine core)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fornax.runtime.errors import ConfigError


def rope_parameters(hf_config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope_theta, scaling dict) from either the v4 (`rope_scaling`) or v5 (`rope_parameters`) keys."""
    params: dict[str, Any] = dict(hf_config.get("rope_parameters") or {})
    scaling = dict(hf_config.get("rope_scaling") or {})
    theta = hf_config.get("rope_theta", params.get("rope_theta", 10000.0))
    merged = {**params, **scaling}
    merged.pop("rope_theta", None)
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    merged["rope_type"] = rope_type
    return float(theta), merged


def _inv_freq_default(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _inv_freq_llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor = s["factor"]
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(base: float, dim: int, s: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    factor = s["factor"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = s.get("attention_factor")
    if attn_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attn_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attn_factor = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast", 32), s.get("beta_slow", 1)
    original = s.get("original_max_position_embeddings") or max_pos

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2).float() - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (
        1.0 / pos_freqs) * extrapolation_factor
    return inv_freq, float(attn_factor)


def compute_inv_freq(base: float, rotary_dim: int, scaling: dict[str, Any],
                     max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin multiplier for one rope variant."""
    rope_type = scaling.get("rope_type", "default")
    inv_freq = _inv_freq_default(base, rotary_dim)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "dynamic":
        # Static NTK-aware base for the extended length (as vLLM does; HF re-derives per batch).
        factor = scaling["factor"]
        new_base = base * (factor * factor - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
        return _inv_freq_default(new_base, rotary_dim), 1.0
    if rope_type == "llama3":
        return _inv_freq_llama3(inv_freq, scaling), 1.0
    if rope_type == "yarn":
        return _yarn(base, rotary_dim, scaling, max_position)
    raise ConfigError(f"unsupported rope_scaling type {rope_type!r}")


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding applied from a precomputed [max_pos, rotary_dim] cos/sin cache."""

    def __init__(self, head_dim: int, max_position: int, base: float,
                 scaling: dict[str, Any] | None = None, partial_rotary_factor: float = 1.0) -> None:
        super().__init__()
        self.rotary_dim = int(head_dim * partial_rotary_factor)
        inv_freq, attn_factor = compute_inv_freq(base, self.rotary_dim, scaling or {}, max_position)
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_position, rotary_dim]
        # Plain attributes, not buffers: they stay float32 when the model is cast to bf16/fp16.
        self.cos_cache = emb.cos() * attn_factor
        self.sin_cache = emb.sin() * attn_factor
        self.fused = None  # FusedCpuOps on bf16 CPU models: rotates q/k in place

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hkv, D] -> rotated copies (rotated in place when fused)."""
        if self.fused is not None and q.dtype == torch.bfloat16 and k.dtype == torch.bfloat16:
            return (self.fused.rotary(positions, q, self.cos_cache, self.sin_cache, self.rotary_dim),
                    self.fused.rotary(positions, k, self.cos_cache, self.sin_cache, self.rotary_dim))
        cos = self.cos_cache[positions].to(q.dtype).unsqueeze(1)  # [T, 1, rotary_dim]
        sin = self.sin_cache[positions].to(q.dtype).unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = rot * cos + rotated * sin
        return torch.cat((out, rest), dim=-1) if rest.numel() else out
