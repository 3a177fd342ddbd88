"""fornax.runtime: the engine (config, scheduler, KV cache, model runner, sampler, offline LLM)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fornax.runtime.sampling.params import SamplingParams

if TYPE_CHECKING:
    from fornax.runtime.offline.llm import LLM

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":  # lazy: importing fornax.runtime must not pull in torch
        from fornax.runtime.offline.llm import LLM

        return LLM
    raise AttributeError(name)
