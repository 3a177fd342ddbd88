"""MODEL (a folder, .gguf file, hub id in the local cache, packaged name) to files (any process)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fornax.runtime.errors import ConfigError, ModelLoadError
from fornax.runtime.loaders import hub_cache

if TYPE_CHECKING:
    from fornax.runtime.config import ModelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFiles:
    """An HF-style model folder and the JSON configs read from it."""

    path: Path
    hf_config: dict[str, Any]
    generation_config: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # what the user named (a .gguf file, a hub id, or the folder itself)
    tokenizer_dir: Path | None = None  # --tokenizer's folder when it is not the model's

    @property
    def tokenizer_path(self) -> Path:
        """The folder whose tokenizer.json (and chat template) is used."""
        return self.tokenizer_dir or self.path

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


def resolve_model_path(model: str | None, revision: str | None = None,
                       download_dir: str | None = None, what: str = "model") -> Path:
    """What MODEL names, on disk: a local folder or file, a hub id from the local Hugging Face
    cache (runtime/loaders/hub_cache.py), a model shipped as a pip package, or (None) the
    packaged default. Nothing is downloaded; ModelLoadError names every place looked at."""
    if model is None or model == "":
        from fornax.runtime.loaders.default_model import default_model_path

        return default_model_path()
    path = Path(model).expanduser()
    if path.exists():
        if revision:
            logger.warning("--revision %s is ignored: %s is a local path, not a hub id",
                           revision, model)
        return path
    from fornax.runtime.loaders.packaged_models import packaged_model_path

    packaged = None if revision else packaged_model_path(model)  # all-MiniLM-L6-v2 and friends
    if packaged is not None:
        return packaged
    if not hub_cache.looks_like_repo_id(model):
        raise ModelLoadError(
            f"{what} path {model!r} does not exist (fornax loads local HF folders, .gguf files "
            "and hub ids from the local Hugging Face cache; it never downloads)")
    return hub_cache.find_in_hub_cache(model, revision, download_dir, what)


def resolve_model_files(model: str | None, load_format: str = "auto", *,
                        revision: str | None = None, download_dir: str | None = None,
                        tokenizer: str | None = None,
                        tokenizer_revision: str | None = None,
                        quantization: str | None = None) -> ModelFiles:
    """Find config.json and friends; a .gguf file is first prepared into a cached folder (its
    weights kept quantized unless FORNAX_GGUF_DEQUANTIZE=1). `tokenizer` (a folder or hub id,
    as vLLM's --tokenizer) replaces the model's tokenizer."""
    source = str(Path(model).expanduser()) if model else ""
    path = resolve_model_path(model, revision, download_dir)
    source = source or str(path)
    if path.is_file() or load_format == "gguf":
        if path.suffix != ".gguf" and load_format != "gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf file")
        path = _prepare_gguf(path)
    elif quantization == "gguf" and not _holds_quantized_gguf(path):
        raise ConfigError(f"--quantization gguf needs a GGUF model (a .gguf file); {path} is not")
    config_path = path / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"{path} has no config.json; is it a Hugging Face model folder?")
    hf_config = _read_json(config_path)
    gen_path = path / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.exists() else {}
    tokenizer_dir = resolve_tokenizer_dir(model, tokenizer, revision, tokenizer_revision,
                                          download_dir)
    return ModelFiles(path=path, hf_config=hf_config, generation_config=gen, source=source,
                      tokenizer_dir=tokenizer_dir)


def resolve_tokenizer_dir(model: str | None, tokenizer: str | None, revision: str | None,
                          tokenizer_revision: str | None, download_dir: str | None
                          ) -> Path | None:
    """--tokenizer's folder (None: the model's own). Its revision defaults to the model's when
    it names the model again, else to main, as in vLLM."""
    if not tokenizer or (tokenizer == model and tokenizer_revision in (None, revision)):
        return None
    folder = resolve_model_path(tokenizer, tokenizer_revision or
                                (revision if tokenizer == model else None), download_dir,
                                what="tokenizer")
    if not (folder / "tokenizer.json").is_file():
        raise ModelLoadError(f"--tokenizer {tokenizer}: {folder} has no tokenizer.json (fornax "
                             "reads the fast tokenizer file)")
    return folder


def files_for(mc: ModelConfig) -> ModelFiles:
    """The files of a ModelConfig (its model, revision, cache folder and tokenizer)."""
    return resolve_model_files(mc.model, mc.load_format, revision=mc.revision,
                               download_dir=mc.download_dir, tokenizer=mc.tokenizer,
                               tokenizer_revision=mc.tokenizer_revision,
                               quantization=mc.quantization)


def _prepare_gguf(path: Path) -> Path:
    from fornax.runtime import env
    from fornax.runtime.loaders.gguf_loader import prepare_gguf

    dequantize = env.GGUF_DEQUANTIZE.get()
    if dequantize:
        logger.info("GGUF %s: weights dequantized at load (FORNAX_GGUF_DEQUANTIZE=1)", path.name)
    return prepare_gguf(path, quantized=not dequantize)


def _holds_quantized_gguf(folder: Path) -> bool:
    """A GGUF folder prepared with its weights kept quantized, named directly."""
    from fornax.runtime.loaders.cache_folders import MARKER_NAME

    try:
        return bool(json.loads((folder / MARKER_NAME).read_text()).get("quantized"))
    except (OSError, ValueError, AttributeError):
        return False


def config_context_length(hf_config: dict[str, Any]) -> int:
    """The model's own context length from its config (2048 when it names none): the bound of
    max_model_len and the positions a decoder's rotary tables must cover (one rule for both)."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if hf_config.get(key):
            return int(hf_config[key])
    return 2048


def derive_max_model_len(hf_config: dict[str, Any], requested: int | None) -> int:
    """The context length: the request if it fits the model, else the model's own."""
    model_len = config_context_length(hf_config)
    if requested is None:
        return model_len
    if requested > model_len:
        raise ConfigError(
            f"max_model_len ({requested}) is larger than the model's maximum context "
            f"({model_len} from config.json)")
    return requested
