"""Resolve a model argument (HF folder, .gguf file, or the packaged default) to its files."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fornax.runtime.errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFiles:
    """An HF-style model folder and the JSON configs read from it."""

    path: Path
    hf_config: dict[str, Any]
    generation_config: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # what the user named (a .gguf file, or the folder itself)

    @property
    def weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ModelLoadError(f"{index} is malformed: {exc}") from exc
            return [self.path / name for name in sorted(set(weight_map.values()))]
        single = self.path / "model.safetensors"
        if single.exists():
            return [single]
        shards = sorted(self.path.glob("*.safetensors"))
        if shards:
            return shards
        raise ModelLoadError(f"no .safetensors weights found in {self.path}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def resolve_model_files(model: str | None, load_format: str = "auto") -> ModelFiles:
    """Find config.json and friends; a .gguf file is first prepared into a cached HF folder."""
    if model is None or model == "":
        from fornax.runtime.loaders.default_model import default_model_path

        model = str(default_model_path())
    path = Path(model).expanduser()
    source = str(path)
    if not path.exists():  # a hub name of a model shipped as a pip package (all-MiniLM-L6-v2)
        from fornax.runtime.loaders.packaged_models import packaged_model_path

        path = packaged_model_path(model) or path
    if not path.exists():
        raise ModelLoadError(
            f"model path {model!r} does not exist (fornax loads local HF folders and .gguf files; "
            "it never downloads from a model hub)")
    if path.is_file() or load_format == "gguf":
        if path.suffix != ".gguf" and load_format != "gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf file")
        from fornax.runtime.loaders.gguf_loader import prepare_gguf

        path = prepare_gguf(path)
    config_path = path / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"{path} has no config.json; is it a Hugging Face model folder?")
    hf_config = _read_json(config_path)
    gen_path = path / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.exists() else {}
    return ModelFiles(path=path, hf_config=hf_config, generation_config=gen, source=source)


def derive_max_model_len(hf_config: dict[str, Any], requested: int | None) -> int:
    """The context length: the request if it fits the model, else the model's own."""
    model_len = None
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if hf_config.get(key):
            model_len = int(hf_config[key])
            break
    if model_len is None:
        model_len = 2048
    if requested is None:
        return model_len
    if requested > model_len:
        raise ConfigError(
            f"max_model_len ({requested}) is larger than the model's maximum context "
            f"({model_len} from config.json)")
    return requested
