"""Which runner a model gets and how it pools: its architecture and sentence-transformers files.

Read by the engine core (to build the pooling model) and, through the READY handshake, by the API
workers (to know which routes the model serves). Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fornax.runtime.engine.messages import PoolingModelInfo
from fornax.runtime.errors import ConfigError
from fornax.runtime.models.registry import EngineKind, lookup_architecture

logger = logging.getLogger(__name__)

RUNNERS = ("auto", "generate", "pooling")
POOLING_TYPES = ("CLS", "MEAN", "MAX", "LAST", "MEAN_SQRT_LEN")

# sentence-transformers Pooling config key -> our pooling type (first true one wins)
_ST_POOLING_KEYS = (
    ("pooling_mode_cls_token", "CLS"),
    ("pooling_mode_mean_tokens", "MEAN"),
    ("pooling_mode_max_tokens", "MAX"),
    ("pooling_mode_mean_sqrt_len_tokens", "MEAN_SQRT_LEN"),
    ("pooling_mode_lasttoken", "LAST"),
)
_ST_MODULE = "sentence_transformers.models."


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not readable JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _st_modules(path: Path) -> list[dict[str, Any]]:
    file = path / "modules.json"
    if not file.exists():
        return []
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file} is not readable JSON: {exc}") from exc
    return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []


def _pooling_architecture(hf_config: dict[str, Any]) -> tuple[str, tuple[str, str]]:
    """The model's architecture (runtime/models/registry.py) and its (family, head) for pooling."""
    arch, entry = lookup_architecture(hf_config)
    if entry.pooling is None:
        raise ConfigError(f"{arch} cannot run as a pooling model")
    return arch, entry.pooling


def resolve_engine_kind(requested: str, hf_config: dict[str, Any], model_dir: Path) -> EngineKind:
    """The engine that serves this model with `--runner requested`: an encoder-decoder model
    (Whisper) always runs its own; otherwise 'generate' or 'pooling', where 'auto' decides by the
    architecture (and, for a causal LM, by the presence of a sentence-transformers Pooling module,
    as Qwen3-Embedding ships)."""
    if requested not in RUNNERS:
        raise ConfigError(f"runner must be one of {', '.join(RUNNERS)}, got {requested!r}")
    arch, entry = lookup_architecture(hf_config)
    if entry.kind == "encoder-decoder":
        return entry.kind
    pooling_only = entry.pooling_only
    if requested == "generate":
        if pooling_only:
            raise ConfigError(f"{arch} has no language-model head and cannot generate text; "
                              "serve it with --runner pooling (or auto)")
        return "generate"
    if requested == "pooling" or pooling_only:
        return "pooling"
    has_st_pooling = any(str(m.get("type", "")).endswith("Pooling") for m in _st_modules(model_dir))
    return "pooling" if has_st_pooling else "generate"


def _st_pooling(model_dir: Path) -> tuple[str | None, bool | None, list[str]]:
    """(pooling type, normalize, unsupported module types) from the sentence-transformers files."""
    modules = _st_modules(model_dir)
    if not modules:
        return None, None, []
    pooling_type: str | None = None
    normalize = False
    unsupported = []
    for module in modules:
        kind = str(module.get("type", "")).removeprefix(_ST_MODULE)
        if kind == "Pooling":
            cfg_file = model_dir / str(module.get("path", "")) / "config.json"
            cfg = _read_json(cfg_file) if cfg_file.exists() else {}
            for key, name in _ST_POOLING_KEYS:
                if cfg.get(key):
                    pooling_type = name
                    break
            if pooling_type is None and cfg.get("pooling_mode"):
                pooling_type = str(cfg["pooling_mode"]).upper().replace("LASTTOKEN", "LAST")
        elif kind == "Normalize":
            normalize = True
        elif kind not in ("Transformer", "Pooling"):
            unsupported.append(kind)
    return pooling_type, normalize, unsupported


def _max_len(hf_config: dict[str, Any], model_dir: Path, requested: int | None) -> int:
    """The model's context, capped by sentence-transformers' `max_seq_length` (as vLLM does)."""
    from fornax.runtime.loaders.model_files import derive_max_model_len

    model_len = derive_max_model_len(hf_config, None)
    if hf_config.get("model_type") in ("roberta", "xlm-roberta") or "Roberta" in str(
            hf_config.get("architectures")):
        model_len -= int(hf_config.get("pad_token_id", 1)) + 1  # positions start after padding_idx
    st_file = model_dir / "sentence_bert_config.json"
    if st_file.exists():
        st_len = _read_json(st_file).get("max_seq_length")
        if isinstance(st_len, int) and 0 < st_len < model_len:
            model_len = st_len
    if requested is None:
        return model_len
    if requested > model_len:
        raise ConfigError(f"max_model_len ({requested}) is larger than the model's maximum "
                          f"context ({model_len})")
    return requested


def _labels(hf_config: dict[str, Any]) -> list[str]:
    id2label = hf_config.get("id2label") or {}
    num = int(hf_config.get("num_labels") or len(id2label) or 2)
    labels = [f"LABEL_{i}" for i in range(max(num, len(id2label)))]
    for key, value in id2label.items():
        try:
            labels[int(key)] = str(value)
        except (ValueError, IndexError):
            continue
    return labels


def _st_prompts(model_dir: Path) -> dict[str, str]:
    file = model_dir / "config_sentence_transformers.json"
    if not file.exists():
        return {}
    prompts = _read_json(file).get("prompts") or {}
    return {str(k): str(v) for k, v in prompts.items() if isinstance(v, str)}


def _truncation_side(model_dir: Path) -> str:
    file = model_dir / "tokenizer_config.json"
    side = _read_json(file).get("truncation_side") if file.exists() else None
    return side if side in ("left", "right") else "right"


def pooling_model_info(hf_config: dict[str, Any], model_dir: Path,
                       max_model_len: int | None = None,
                       overrides: dict[str, Any] | None = None) -> PoolingModelInfo:
    """Everything about a pooling model that the engine and the API workers must agree on."""
    arch, (family, head) = _pooling_architecture(hf_config)
    overrides = dict(overrides or {})
    st_type, st_norm, unsupported = _st_pooling(model_dir)
    if unsupported and head == "embed":
        raise ConfigError(f"the sentence-transformers modules {unsupported} of {model_dir} are not "
                          "supported (fornax runs Transformer, Pooling and Normalize)")
    default_type = "CLS" if family == "encoder" else "LAST"
    pooling_type = str(overrides.pop("pooling_type", None) or st_type or default_type).upper()
    if pooling_type not in POOLING_TYPES:
        raise ConfigError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}, "
                          f"got {pooling_type!r}")
    normalize = overrides.pop("normalize", None)
    if normalize is None:
        normalize = st_norm if st_norm is not None else True
    if overrides:
        raise ConfigError(f"unknown pooler_config keys: {', '.join(sorted(overrides))}")
    hidden = int(hf_config.get("hidden_size") or 0)
    matryoshka = [int(d) for d in hf_config.get("matryoshka_dimensions") or []]
    labels = _labels(hf_config) if head == "classify" else []
    tasks = ["embed", "score", "encode"] if head == "embed" else ["classify", "encode"]
    if head == "classify" and len(labels) == 1:
        tasks.append("score")  # a cross-encoder: one relevance logit per (query, document) pair
    return PoolingModelInfo(
        architecture=arch, family=family, head=head, tasks=tasks, pooling_type=pooling_type,
        normalize=bool(normalize), hidden_size=hidden,
        is_matryoshka=bool(hf_config.get("is_matryoshka") or matryoshka),
        matryoshka_dimensions=matryoshka, labels=labels,
        max_model_len=_max_len(hf_config, model_dir, max_model_len),
        truncation_side=_truncation_side(model_dir), prompts=_st_prompts(model_dir))


def parse_pooler_config(value: Any) -> dict[str, Any]:
    """`--pooler-config '{"pooling_type": "MEAN", "normalize": false}'` (JSON text or a dict)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"pooler_config is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError("pooler_config must be a JSON object")
    return {k.lower(): v for k, v in value.items()}
