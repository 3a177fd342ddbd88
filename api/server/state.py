"""Per-worker state: settings, tokenizer, engine client, metrics, model names (API worker)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fornax.api.engine.client import EngineClient
from fornax.api.routes.chat_features import ChatFeatures
from fornax.api.server.errors import APIError
from fornax.api.server.metrics import Metrics
from fornax.api.server.settings import ServerSettings
from fornax.runtime.sampling.request_prep import generation_defaults
from fornax.runtime.text.output_processor import OutputProcessor
from fornax.runtime.text.tokenizer import TokenizerFront

if TYPE_CHECKING:
    from fornax.api.responses.routes import ResponsesService
    from fornax.api.server.model_set import ModelSet

logger = logging.getLogger(__name__)


class AppState:
    """Everything a handler needs about one served model; built once per worker and model at
    lifespan start. `models` is the server's set (api/server/model_set.py): what the models share
    (draining, the /v1/responses store) lives there."""

    def __init__(self, settings: ServerSettings) -> None:
        from fornax.api.server.model_set import ModelSet

        self.settings = settings
        self.engine_info = settings.engine
        self.max_model_len = settings.engine.max_model_len
        self.tokenizer = TokenizerFront(settings.engine.tokenizer_path or
                                        settings.engine.model_path, settings.chat_template)
        self.tokenizer.default_template_kwargs = dict(settings.default_chat_template_kwargs or {})
        self.processor = OutputProcessor(self.tokenizer)
        self.engine = EngineClient(settings.ipc_dir, settings.request_timeout_s)
        self.model_name = settings.served_model_names[0]
        self.metrics = Metrics(self.model_name, self.max_model_len, settings.cache_config_info,
                               settings.api_server_count)
        self.names = list(dict.fromkeys(settings.served_model_names + settings.model_aliases))
        self._names = set(self.names)
        self.sampling_defaults = self._sampling_defaults(settings)
        self.chat_features = ChatFeatures.from_settings(settings)  # tool and reasoning parsers
        self.num_inflight = 0
        self.models: ModelSet = ModelSet([self])  # replaced by the server's set when it has many

    @property
    def draining(self) -> bool:
        return self.models.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.models.draining = value

    @property
    def responses(self) -> ResponsesService | None:
        """/v1/responses: store and background runs (made on first use), one for all models."""
        return self.models.responses

    @responses.setter
    def responses(self, value: ResponsesService | None) -> None:
        self.models.responses = value

    async def start(self) -> None:
        await self.engine.start()

    async def close(self) -> None:
        if self.responses is not None:
            await self.responses.close()
        await self.engine.close()

    def resolve_model(self, requested: str | None) -> str:
        """The model name to answer with; 404 for a model this server does not serve."""
        if requested is None or requested == "":
            return self.model_name
        if requested in self._names:
            return requested
        raise APIError(404, f"The model `{requested}` does not exist.", "model")

    @staticmethod
    def _sampling_defaults(settings: ServerSettings) -> dict[str, Any]:
        if settings.generation_config != "auto":
            return {}
        path = Path(settings.engine.model_path) / "generation_config.json"
        if not path.exists():
            return {}
        try:
            gen = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            logger.warning("ignoring unreadable %s", path)
            return {}
        defaults = generation_defaults(gen)  # the offline LLM's rule too
        if defaults:
            logger.info("default sampling parameters from the model's generation_config.json: %s "
                        "(--generation-config fornax turns them off)", defaults)
        return defaults
