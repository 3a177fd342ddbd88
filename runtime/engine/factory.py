"""`make_engine_core`: the one place that picks and builds an engine core for a config (engine-core
process, offline APIs)."""

from __future__ import annotations

import logging

from fornax.runtime import env
from fornax.runtime.config import EngineConfig
from fornax.runtime.engine.contract import EngineCore
from fornax.runtime.loaders.model_files import files_for, resolve_model_files
from fornax.runtime.pooling.config import resolve_engine_kind

logger = logging.getLogger(__name__)


def make_engine_core(config: EngineConfig) -> EngineCore:
    """The core of the model's engine kind (runtime/models/registry.py): `GenerateEngineCore` for
    text generation, `PoolingEngineCore` for pooling models (`--runner auto|generate|pooling`),
    `EncoderDecoderEngineCore` for speech-to-text (Whisper, by architecture)."""
    from fornax.runtime.loaders.speech_models import resolve_speech_model

    env.check_engine_variables()  # a bad value refuses to start, never fails a step later
    mc = config.model_config
    speech = resolve_speech_model(mc.model) if mc.model else None  # packaged name, CT2 folder
    files = resolve_model_files(str(speech), mc.load_format) if speech else files_for(mc)
    kind = resolve_engine_kind(mc.runner, files.hf_config, files.path)
    logger.debug("%s runs on the %s engine", files.path, kind)
    if kind == "encoder-decoder":
        from fornax.runtime.encoder_decoder.core import EncoderDecoderEngineCore

        return EncoderDecoderEngineCore(config, files)
    if kind == "pooling":
        from fornax.runtime.pooling.core import PoolingEngineCore

        return PoolingEngineCore(config, files)
    from fornax.runtime.engine.generate_core import GenerateEngineCore

    return GenerateEngineCore(config, files)
