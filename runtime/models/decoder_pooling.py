"""A Llama-family decoder as an embedder: hidden states without a KV cache or LM head (engine core).

Qwen3-Embedding-style models: the causal decoder of `llama.py` run over whole prompts, its final
hidden states pooled (last token or mean) by the pooling runner. Checkpoints saved as the base model
(`Qwen3Model`: `layers.0...`) or as the causal LM (`model.layers.0...`, `lm_head` ignored) both
load.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fornax.runtime.loaders.weights import STACKED_DECODER, Place, rename
from fornax.runtime.models.llama import DecoderModel, DecoderSpec
from fornax.runtime.pooling.attention import VarlenAttentionBackend, VarlenMetadata


class DecoderForPooling(nn.Module):
    """`forward` gives the final (normed) hidden states [T, hidden] of whole sequences."""

    has_classifier = False

    def __init__(self, hf_config: dict[str, Any], arch: str) -> None:
        super().__init__()
        self.arch = arch
        self.spec = DecoderSpec.from_hf(hf_config, arch)
        self.backend = VarlenAttentionBackend(self.spec.head_dim)
        self.model = DecoderModel(self.spec, self.backend)  # type: ignore[arg-type]
        self._no_cache: list[Any] = [None] * self.spec.num_layers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor, meta: VarlenMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, self._no_cache, meta)

    def checkpoint_name(self, name: str) -> Place | None:
        """An HF checkpoint tensor's parameter and shard (None: not loaded; see loaders.weights)."""
        if name.startswith(("lm_head.", "score.")) or "rotary_emb.inv_freq" in name:
            return None
        if not name.startswith("model."):
            name = "model." + name
        return rename(name, STACKED_DECODER)
