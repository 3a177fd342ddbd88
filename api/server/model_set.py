"""The models one server runs, and which one a request is for, by its `model` (API workers).

A one-model server has a one-entry set and routes nothing: every handler resolves the name as it
always did. A many-model server (`models:` in the config, or `fornax serve` with no MODEL) reads
the request's `model` before the handler runs (the JSON body's field, the audio form's part, or
`?model=` on the GET and admin routes) and hands the handler that model's AppState, so each route
keeps its own checks (a chat request for an embedding model is still 501). A request without a
model goes to the first model that serves its route; an unknown name is a 404.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from fornax.api.multipart import MultipartError, parse_multipart
from fornax.api.server.errors import APIError
from fornax.api.server.model_settings import ModelSettings
from fornax.api.server.settings import ServerSettings

if TYPE_CHECKING:
    from fornax.api.responses.routes import ResponsesService
    from fornax.api.server.http import Request
    from fornax.api.server.state import AppState

# the runner a route needs when the request names no model
_POOLING_PATHS = frozenset({"/v1/embeddings", "/v2/embed", "/pooling", "/classify", "/score",
                            "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank"})
_AUDIO_PATHS = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})
_GENERATE_PATHS = frozenset({"/v1/chat/completions", "/v1/chat/completions/batch",
                             "/v1/completions", "/v1/responses", "/v1/messages",
                             "/v1/messages/count_tokens", "/v1/chat/completions/render",
                             "/v1/completions/render"})
_TEXT_PATHS = frozenset({"/tokenize", "/detokenize", "/v1/tokenize", "/v1/detokenize",
                         "/invocations"})
_JSON_PATHS = _POOLING_PATHS | _GENERATE_PATHS | _TEXT_PATHS
_GENERATE_KEYS = ("messages", "prompt")  # /invocations: a generation body (else pooling)


class _Named(msgspec.Struct):
    """The one field the router reads from a JSON body (everything else is skipped)."""

    model: Any = None


def model_settings(settings: ServerSettings, entry: ModelSettings) -> ServerSettings:
    """The settings one model's AppState sees: the server's, with that model's fields."""
    extra: dict[str, Any] = {}
    if entry.reasoning_parser is not None:
        extra["reasoning_parser"] = entry.reasoning_parser
    if entry.tool_call_parser is not None:
        extra["tool_call_parser"] = entry.tool_call_parser
    return msgspec.structs.replace(
        settings, ipc_dir=entry.ipc_dir, engine=entry.engine,
        served_model_names=entry.served_model_names, model_root=entry.model_root,
        model_aliases=entry.model_aliases, chat_template=entry.chat_template,
        generation_config=entry.generation_config, cache_config_info=entry.cache_config_info,
        models=[], **extra)


def build_states(settings: ServerSettings) -> ModelSet:
    """One AppState per model of these settings, in a set (one model: a set of one)."""
    from fornax.api.server.state import AppState

    if not settings.models:
        return AppState(settings).models
    states = [AppState(model_settings(settings, entry)) for entry in settings.models]
    for state in states:  # `fornax serve` restarts a dead model's engine: reconnect then
        state.engine.revive = True
    return ModelSet(states)


def not_found(name: str) -> APIError:
    """vLLM's and OpenAI's answer for a model the server does not serve."""
    return APIError(404, f"The model `{name}` does not exist.", "model")


class ModelSet:
    """Every model's AppState, in the configured order (the first is the default)."""

    def __init__(self, states: list[AppState]) -> None:
        self.states = states
        self.primary = states[0]
        self.by_name: dict[str, AppState] = {}
        for state in states:
            state.models = self
            for name in state.names:
                self.by_name.setdefault(name, state)
        self.draining = False
        self.responses: ResponsesService | None = None  # /v1/responses' store: one per worker

    async def start(self) -> None:
        for state in self.states:
            await state.engine.start()

    async def close(self) -> None:
        if self.responses is not None:
            await self.responses.close()
        for state in self.states:
            await state.engine.close()

    @property
    def many(self) -> bool:
        return len(self.states) > 1

    def find(self, name: str | None) -> AppState:
        """The model called `name` (None or "": the default one); 404 if there is none."""
        if not name:
            return self.primary
        state = self.by_name.get(name)
        if state is None:
            raise not_found(name)
        return state

    def first(self, runner: str) -> AppState:
        """The first model with this runner (generate, pooling, transcription), else the first
        model (whose route check then answers as a one-model server would)."""
        for state in self.states:
            if state.engine_info.runner == runner:
                return state
        return self.primary

    def speech_model(self, current: AppState, name: str | None, buffered: int) -> AppState:
        """WS /v1/realtime's session.update: the model a session transcribes with (the one it
        has, unless the name is another Whisper model's and no audio is buffered yet)."""
        if not self.many or not name or name in current.names:
            return current
        target = self.find(name)
        if target.engine_info.runner != "transcription":
            raise APIError(404, f"the model `{name}` is not a speech-to-text model; realtime "
                           "transcription needs a Whisper model", "model")
        if buffered:
            raise APIError(400, f"the session already holds audio for {current.model_name}; "
                           f"open a new session for `{name}`", "model")
        return target

    async def select(self, req: Request) -> None:
        """Point `req.state` at the model the request names (many-model servers only)."""
        if not self.many:
            return
        path = req.path
        name: str | None
        if req.method == "GET" or path in ("/sleep", "/wake_up", "/reset_prefix_cache"):
            name = (req.query.get("model") or [""])[-1]
            req.state = self.find(name) if name else self.default_for(path)
            return
        if path in _AUDIO_PATHS:
            name = await _form_model(req)
        elif path in _JSON_PATHS:
            body = await _json_model(req)
            name = body.model if isinstance(body.model, str) else None
            if path == "/invocations" and not name:
                req.state = self.first("generate" if isinstance(body, _Keys) and body.generate
                                       else "pooling")
                return
        else:
            return
        req.state = self.find(name) if name else self.default_for(path)

    def default_for(self, path: str) -> AppState:
        """The model a request without `model` goes to: the first that serves its route."""
        if path in _POOLING_PATHS:
            return self.first("pooling")
        if path in _AUDIO_PATHS or path == "/v1/realtime":
            return self.first("transcription")
        if path in _GENERATE_PATHS or path in _TEXT_PATHS or path == "/health_generate":
            return self.first("generate")
        return self.primary


class _Keys(_Named):
    """/invocations: whether the body looks like a generation request."""

    generate: bool = False


async def _json_model(req: Request) -> _Named:
    """The body's `model`; a body that is not a JSON object names none (its handler refuses it
    with the usual 400). The body is read here under its usual limit and kept for the handler."""
    body = await req.body()
    try:
        named = msgspec.json.decode(body, type=_Named)
    except (msgspec.DecodeError, RecursionError):
        return _Named()
    if req.path == "/invocations":
        keys = _Keys(model=named.model)
        try:
            raw = msgspec.json.decode(body)
        except (msgspec.DecodeError, RecursionError):
            return keys
        keys.generate = isinstance(raw, dict) and any(k in raw for k in _GENERATE_KEYS)
        return keys
    return named


async def _form_model(req: Request) -> str | None:
    """The audio form's `model` part (read under the audio route's own body limit)."""
    from fornax.api.routes.audio import _FORM_SLACK_BYTES, max_audio_bytes

    limit = max(max_audio_bytes(req.state) + _FORM_SLACK_BYTES,
                req.state.settings.max_request_body_bytes)
    declared = req.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None  # the handler answers 413 before reading it
    body = await req.body(limit=limit)
    try:
        parts = parse_multipart(body, req.headers.get("content-type"))
    except MultipartError:
        return None
    for part in reversed(parts):  # the last one wins, as in the form parser
        if part.name == "model":
            try:
                return part.text() or None
            except MultipartError:
                return None
    return None
