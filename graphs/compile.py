"""torch.compile of the model forward, piecewise around attention (engine-core process).

Each decoder layer is two fused pieces: everything before attention (norm, QKV projection, q/k
norm, rotary) and everything after it (output projection, residual, norm, MLP, residual). The
attention call between them stays outside the graph, so any backend works and each piece holds
`fullgraph=True`. All layers share one compiled graph per piece: parameters are graph inputs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from fornax.runtime import env
from fornax.runtime.loaders.cache_folders import cache_root as fornax_cache_root

logger = logging.getLogger(__name__)


def enable_compile_cache(cache_root: str | None = None) -> Path:
    """Point Inductor's on-disk caches at fornax's cache so restarts reuse compiled kernels."""
    path = fornax_cache_root(cache_root) / "inductor"
    path.mkdir(parents=True, exist_ok=True)
    if not env.TORCHINDUCTOR_CACHE_DIR.is_set():
        env.TORCHINDUCTOR_CACHE_DIR.set(str(path))
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    return path


def _attention_inputs(layer: torch.nn.Module, positions: torch.Tensor, x: torch.Tensor):
    return layer.attention_inputs(positions, x)


def _after_attention(layer: torch.nn.Module, x: torch.Tensor, attn: torch.Tensor):
    return layer.after_attention(x, attn)


def _final_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return norm(x)


class PiecewiseCompiledForward:
    """Drop-in for `model.forward(input_ids, positions, kv_caches, attn_metadata)`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        decoder = model.model
        if not all(hasattr(layer, "attention_inputs") for layer in decoder.layers):
            raise TypeError(f"{type(model).__name__} does not expose the piecewise interface")
        self.decoder = decoder
        compile_kw: dict[str, Any] = {"fullgraph": True, "dynamic": True}
        self._before = torch.compile(_attention_inputs, **compile_kw)
        self._after = torch.compile(_after_attention, **compile_kw)
        self._norm = torch.compile(_final_norm, **compile_kw)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 kv_caches: list[torch.Tensor], attn_metadata: Any) -> torch.Tensor:
        x = self.decoder.embed_tokens(input_ids)
        for layer, kv_cache in zip(self.decoder.layers, kv_caches):
            q, k, v = self._before(layer, positions, x)
            attn = layer.self_attn.backend.forward(q, k, v, kv_cache, attn_metadata)
            x = self._after(layer, x, attn)
        return self._norm(self.decoder.norm, x)


# Compiled entries each shared piece may hold: one per (model class, shape, dtype) served in this
# process. torch's default of 8 is reached by a test session or a multi-model process, and past
# it `fullgraph=True` turns a recompile into a hard failure.
RECOMPILE_LIMIT = 64


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Lift dynamo's per-function recompile limit to at least `limit` (never lowers it)."""
    import torch._dynamo.config as dynamo_config

    if dynamo_config.recompile_limit < limit:
        dynamo_config.recompile_limit = limit
    if dynamo_config.accumulated_recompile_limit < 4 * limit:
        dynamo_config.accumulated_recompile_limit = 4 * limit


def compile_model_forward(model: torch.nn.Module) -> PiecewiseCompiledForward:
    """Wrap the model; compilation itself happens on the first calls (the runner warms up)."""
    enable_compile_cache()
    raise_recompile_limit()
    start = time.perf_counter()
    forward = PiecewiseCompiledForward(model)
    logger.debug("compile wrappers ready in %.2f s", time.perf_counter() - start)
    return forward
