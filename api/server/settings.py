"""Server settings handed from `fornax serve` to every API worker (JSON in an env variable)."""

from __future__ import annotations

from typing import Any

import msgspec

from fornax.api.server.model_settings import ModelSettings
from fornax.runtime import env
from fornax.runtime.engine.messages import EngineHandshake
from fornax.runtime.limits import InputLimits

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


class ServerSettings(msgspec.Struct, omit_defaults=True):
    """What an API worker needs: where the engine is, what it serves, and the HTTP policy."""

    ipc_dir: str
    engine: EngineHandshake
    served_model_names: list[str]
    model_root: str
    model_aliases: list[str] = []
    api_keys: list[str] = []
    allowed_origins: list[str] = []
    chat_template: str | None = None
    chat_template_content_format: str = "auto"
    default_chat_template_kwargs: dict[str, Any] | None = None  # under each request's own
    trust_request_chat_template: bool = False
    generation_config: str = "auto"
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    input_limits: InputLimits = InputLimits()  # --max-n, --max-stop-strings, ...
    max_audio_filesize_mb: float = 25.0  # audio uploads beyond this get 413
    max_audio_seconds: float = 7200.0  # decoded audio longer than this gets 400 (at 16 kHz)
    realtime_max_sessions: int = 100  # WS /v1/realtime: open sessions per API worker
    realtime_max_buffer_s: float = 300.0  # WS /v1/realtime: audio waiting to be transcribed
    realtime_max_session_s: float = 3600.0  # a realtime session is closed after this long
    realtime_idle_timeout_s: float = 60.0  # ... or after this long without a client event
    realtime_vad: str = "silero"  # WS /v1/realtime: the turn detector (silero or energy)
    log_requests: bool = True
    request_timeout_s: float | None = None  # --request-timeout: deadline of every request
    engine_stall_timeout_s: float = 60.0  # --engine-stall-timeout: /health 503 (0: off)
    enable_dev_endpoints: bool = False  # /sleep, /wake_up, /is_sleeping, /reset_prefix_cache
    disable_fastapi_docs: bool = False  # no /docs and no /openapi.json
    enable_tokenizer_info_endpoint: bool = False  # /tokenizer_info and /get_tokenizer_info
    responses_store: str = "memory"  # /v1/responses: "memory" (per worker) or "sqlite:PATH"
    responses_store_max_count: int = 10000
    responses_store_max_age_s: float = 24 * 3600.0
    responses_store_max_bytes: int = 512 * 1024 * 1024  # JSON bytes of all stored responses
    responses_store_max_record_bytes: int = 16 * 1024 * 1024  # one stored response
    responses_max_background: int = 64  # background responses running per API key and worker
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None  # a registered name (built-in or from the plugin)
    tool_parser_plugin: str | None = None  # a Python file that registers tool parsers
    reasoning_parser: str | None = None
    created: int = 0
    version: str = ""
    cache_config_info: dict[str, str] = {}  # vllm:cache_config_info labels (metrics.py)
    api_server_count: int = 1  # process_* metrics are exported only with one API worker
    # a many-model server: every model, the first one's values also in the fields above (empty:
    # one model, the fields above); api/server/model_set.py routes requests by `model`
    models: list[ModelSettings] = []


def settings_to_env(settings: ServerSettings) -> None:
    env.SERVER_SETTINGS.set(msgspec.json.encode(settings).decode())


def settings_from_env() -> ServerSettings:
    raw = env.SERVER_SETTINGS.get()
    if not raw:
        raise RuntimeError(f"{env.SERVER_SETTINGS.name} is not set: API workers are started by "
                           "`fornax serve`")
    return msgspec.json.decode(raw.encode(), type=ServerSettings)
