"""A Llama-family decoder as an embedder: hidden states without a KV cache or LM head (engine core).

Qwen3-Embedding-style models: the causal decoder of `llama.py` run over whole prompts, its final
hidden states pooled (last token or mean) by the pooling runner. Checkpoints saved as the base model
(`Qwen3Model`: `layers.0...`) or as the causal LM (`model.layers.0...`, `lm_head` ignored) both
load.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from fornax.runtime.errors import ConfigError
from fornax.runtime.models.llama import DecoderModel, DecoderSpec
from fornax.runtime.pooling.attention import VarlenAttentionBackend, VarlenMetadata
from torch import nn

# HF checkpoint name fragment -> (our fused parameter fragment, shard id)
_STACKED = (
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)


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

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.startswith(("lm_head.", "score.")) or "rotary_emb.inv_freq" in name:
                continue
            if not name.startswith("model."):
                name = "model." + name
            shard: str | int | None = None
            for hf_part, ours, shard_id in _STACKED:
                if hf_part in name:
                    name, shard = name.replace(hf_part, ours), shard_id
                    break
            param = params.get(name)
            if param is None:
                raise ConfigError(f"checkpoint tensor {name!r} has no place in {self.arch} "
                                  "(as an embedding model)")
            loader = getattr(param, "weight_loader", None)
            with torch.no_grad():
                if loader is not None:
                    loader(param, tensor.to(param.dtype), shard)
                elif param.shape != tensor.shape:
                    raise ConfigError(f"{name}: checkpoint shape {tuple(tensor.shape)} does not "
                                      f"match the model's {tuple(param.shape)}")
                else:
                    param.data.copy_(tensor)
            loaded.add(name)
        return loaded
