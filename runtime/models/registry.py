"""Registry from HF `architectures` names to fornax model classes (engine core)."""

from __future__ import annotations

from typing import Any

from fornax.runtime.errors import ConfigError

# architecture name -> "module:Class" (imported lazily)
_CAUSAL_LM = {
    "LlamaForCausalLM": "fornax.runtime.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "fornax.runtime.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "fornax.runtime.models.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "fornax.runtime.models.llama:LlamaForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_CAUSAL_LM)


def resolve_architecture(hf_config: dict[str, Any]) -> tuple[str, type]:
    """The first supported name in config.json's `architectures`, and its class."""
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in _CAUSAL_LM:
            module_name, cls_name = _CAUSAL_LM[arch].split(":")
            import importlib

            return arch, getattr(importlib.import_module(module_name), cls_name)
    raise ConfigError(
        f"unsupported model architecture {archs or '(none given)'}; fornax supports: "
        + ", ".join(supported_architectures())
    )
