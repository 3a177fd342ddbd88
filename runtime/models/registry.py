"""The architecture registry: each HF `architectures` name, the engine that serves it and the model
class it runs (engine core; nothing here imports torch, the classes are imported lazily)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from fornax.runtime.errors import ConfigError

EngineKind = Literal["generate", "pooling", "encoder-decoder"]
PoolingFamily = Literal["encoder", "decoder"]  # BERT-like bidirectional, or causal (Llama-like)

_CAUSAL_LM = "fornax.runtime.models.llama:LlamaForCausalLM"
_WHISPER = "fornax.runtime.models.whisper:WhisperForConditionalGeneration"
# the pooling model of each family (`--runner pooling`)
POOLING_MODELS: dict[str, str] = {
    "encoder": "fornax.runtime.models.bert:EncoderForPooling",
    "decoder": "fornax.runtime.models.decoder_pooling:DecoderForPooling",
}


@dataclass(frozen=True)
class Architecture:
    """How fornax serves one architecture: `kind` is its engine, `model` the class that engine
    runs ("module:Class"); `pooling` the (family, head) the pooling engine runs it with, None
    when it cannot pool. A causal LM generates, and pools too (as Qwen3-Embedding ships)."""

    kind: EngineKind
    model: str
    pooling: tuple[PoolingFamily, str] | None = None

    @property
    def pooling_only(self) -> bool:
        """No language-model head: it cannot generate text."""
        return self.kind == "pooling"


def _causal_lm() -> Architecture:
    return Architecture("generate", _CAUSAL_LM, ("decoder", "embed"))


def _pooling(family: PoolingFamily, head: str) -> Architecture:
    return Architecture("pooling", POOLING_MODELS[family], (family, head))


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": _causal_lm(),
    "MistralForCausalLM": _causal_lm(),
    "Qwen2ForCausalLM": _causal_lm(),
    "Qwen3ForCausalLM": _causal_lm(),
    "LlamaModel": _pooling("decoder", "embed"),
    "MistralModel": _pooling("decoder", "embed"),
    "Qwen2Model": _pooling("decoder", "embed"),
    "Qwen3Model": _pooling("decoder", "embed"),
    "BertModel": _pooling("encoder", "embed"),
    "BertForSequenceClassification": _pooling("encoder", "classify"),
    "RobertaModel": _pooling("encoder", "embed"),
    "RobertaForSequenceClassification": _pooling("encoder", "classify"),
    "XLMRobertaModel": _pooling("encoder", "embed"),
    "XLMRobertaForSequenceClassification": _pooling("encoder", "classify"),
    "WhisperForConditionalGeneration": Architecture("encoder-decoder", _WHISPER),
}


def supported_architectures(kind: EngineKind | None = None) -> list[str]:
    """The architecture names fornax serves (those of one engine kind if given), sorted."""
    return sorted(a for a, e in ARCHITECTURES.items() if kind is None or e.kind == kind)


def lookup_architecture(hf_config: dict[str, Any],
                        kind: EngineKind | None = None) -> tuple[str, Architecture]:
    """The first name in config.json's `architectures` that fornax serves (with an engine of
    `kind` if given), and its entry; a ConfigError naming the supported ones otherwise."""
    archs = hf_config.get("architectures") or []
    for arch in archs:
        entry = ARCHITECTURES.get(arch)
        if entry is not None and (kind is None or entry.kind == kind):
            return arch, entry
    raise ConfigError(
        f"unsupported model architecture {archs or '(none given)'}; fornax supports: "
        + ", ".join(supported_architectures(kind)))


def model_class(spec: str) -> type:
    """Import the class named "module:Class"."""
    module_name, cls_name = spec.split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def resolve_architecture(hf_config: dict[str, Any]) -> tuple[str, type]:
    """The generation model: the first causal-LM name in `architectures`, and its class."""
    arch, entry = lookup_architecture(hf_config, "generate")
    return arch, model_class(entry.model)
