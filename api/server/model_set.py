"""The models one server runs, and which one a request is for, by its `model` (API workers).

A one-model server has a one-entry set and routes nothing: every handler resolves the name as it
always did. A many-model server (`models:` in the config, or `fornax serve` with no MODEL) reads
the request's `model` before the handler runs (the JSON body's field, the audio form's part, or
`?model=` on the GET and admin routes) and hands the handler that model's AppState, so each route
keeps its own checks (a chat request for an embedding model is still 501). A request without a
model goes to the first model that serves its route; an unknown name is a 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from fornax.api.engine.manager_client import ManagerClient, control_address
from fornax.api.multipart import MultipartError, parse_multipart
from fornax.api.server.errors import APIError, overloaded
from fornax.api.server.model_settings import ModelSettings
from fornax.api.server.settings import ServerSettings
from fornax.runtime.engine.messages import ModelStates
from fornax.runtime.limits import MAX_KEEP_ALIVE_S, MAX_LOAD_WAITERS

logger = logging.getLogger(__name__)

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
# routes that never reach the engine: they do not load an unloaded model
_NO_ENGINE_PATHS = frozenset({"/tokenize", "/detokenize", "/v1/tokenize", "/v1/detokenize",
                              "/v1/chat/completions/render", "/v1/completions/render",
                              "/v1/messages/count_tokens"})
LOAD_TIMEOUT_S = 600.0  # a request waits this long at most for its model to load
_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class _Named(msgspec.Struct):
    """The fields the router reads from a JSON body (everything else is skipped)."""

    model: Any = None
    keep_alive: Any = None


class RouterFields(msgspec.Struct):
    """What a request body says about its model: `model` (a string, else None), `keep_alive`
    as sent (keep_alive_seconds checks it) and, for /invocations, whether it is a generation
    body."""

    model: str | None = None
    keep_alive: Any = None
    generate: bool = False


def router_fields(path: str, body: bytes, content_type: str | None) -> RouterFields:
    """The router fields of a POST body (pure; `fornax serve`'s many-model router and the Ray
    ingress both read them here): the JSON body's fields on the JSON routes, the audio form's
    parts on the audio routes (the last of each wins, as in the form parser; a `model` that is
    not UTF-8 names none, such a `keep_alive` is refused). A body that cannot be read names
    nothing: its handler answers it with the usual 400."""
    if path in _AUDIO_PATHS:
        try:
            parts = parse_multipart(body, content_type)
        except MultipartError:
            return RouterFields()
        found: dict[str, str | None] = {}
        for part in reversed(parts):
            if part.name in ("model", "keep_alive") and part.name not in found:
                try:
                    found[part.name] = part.text().strip() or None  # as the form parser reads it
                except MultipartError:
                    found[part.name] = None if part.name == "model" else "(not UTF-8)"
        return RouterFields(found.get("model"), found.get("keep_alive"))
    if path not in _JSON_PATHS:
        return RouterFields()
    try:
        named = msgspec.json.decode(body, type=_Named)
    except (msgspec.DecodeError, RecursionError):
        return RouterFields()
    fields = RouterFields(named.model if isinstance(named.model, str) else None,
                          named.keep_alive)
    if path == "/invocations":
        try:
            raw = msgspec.json.decode(body)
        except (msgspec.DecodeError, RecursionError):
            return fields
        fields.generate = isinstance(raw, dict) and any(k in raw for k in _GENERATE_KEYS)
    return fields


def keep_alive_seconds(value: Any) -> float | None:
    """A request's keep_alive (Ollama's): seconds, or a duration ("30s", "5m", "1h"), for the
    model to stay loaded after the request; 0 unloads it at once, a negative value keeps it
    loaded. 400 naming keep_alive for anything else or beyond a week."""
    if value is None:
        return None
    seconds = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value) if abs(value) <= 1e300 else math.nan  # float() of a huge int raises
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if not math.isfinite(seconds) or seconds > MAX_KEEP_ALIVE_S:
        raise APIError(400, "keep_alive must be a number of seconds or a duration such as "
                       f"\"30s\", \"5m\" or \"1h\" (at most {MAX_KEEP_ALIVE_S} s; negative: "
                       "stay loaded), got " + repr(value)[:64], "keep_alive")
    return -1.0 if seconds < 0 else seconds


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
        state.engine.revive = state.engine.managed = True
    models = ModelSet(states)
    models.manager = ManagerClient(control_address(settings.models[0].ipc_dir))
    return models


def _refused(reply: ModelStates) -> APIError:
    """The manager could not give a request its model: 503, with Retry-After unless waiting
    cannot help (a model larger than the whole memory budget)."""
    return APIError(503, reply.error, headers=None if reply.lasting else {"retry-after": "5"})


def serves(state: AppState, path: str, generate: bool = False) -> bool:
    """Whether the model's runner serves the route (else its handler answers 501 without the
    engine, so a mismatched request never loads the model). `generate`: an /invocations body
    for generation (else pooling; a pooling model serves `messages` too: embeddings or
    classification, api/routes/sagemaker.py)."""
    runner = state.engine_info.runner
    if path in _POOLING_PATHS or (path == "/invocations" and not generate):
        return runner == "pooling"
    if path == "/invocations" and runner == "pooling":
        return True
    if path in _AUDIO_PATHS:
        return runner == "transcription"
    if path in _GENERATE_PATHS or path == "/invocations":
        return runner == "generate"
    return True


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
        self.manager: ManagerClient | None = None  # many models: load and unload on demand
        self._waiting = [0] * len(states)  # requests of this worker waiting for a model's load
        self._leases: dict[int, tuple[int, float | None]] = {}  # id(request) -> (model, keep)
        self._telling: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        loaded = [True] * len(self.states)
        if self.manager is not None:
            await self.manager.start()
            loaded = [s == "loaded" for s in await self.model_states()]
        for state, on in zip(self.states, loaded, strict=True):
            await state.engine.start(loaded=on)

    async def close(self) -> None:
        if self.responses is not None:
            await self.responses.close()
        for state in self.states:
            await state.engine.close()
        if self.manager is not None:
            await self.manager.close()

    async def model_states(self) -> list[str]:
        """Each model's load state (loaded, loading, unloading, unloaded, failed; with
        idle_action sleep also sleeping, asleep, waking)."""
        if self.manager is None:
            return ["failed" if s.engine.dead else "loaded" for s in self.states]
        return (await self.manager.ask("status")).states

    async def admin(self, op: str, state: AppState) -> list[str]:
        """POST /v1/models/{id}/load (waits until it is loaded) or /unload."""
        if self.manager is None:
            raise APIError(400, "load and unload need a many-model server (--models)", "model")
        reply = await self.manager.ask(op, self.states.index(state), LOAD_TIMEOUT_S)
        if reply.error:
            raise _refused(reply)
        i = self.states.index(state)
        deadline = asyncio.get_running_loop().time() + LOAD_TIMEOUT_S
        while op == "load" and state.engine.dead:  # this worker reconnects within 0.5 s,
            try:  # unless the model (no request holds it) idled out meanwhile: loaded, as asked
                await state.engine.wait_alive(1.0)
            except APIError:
                if (await self.model_states())[i] not in ("loaded", "loading"):
                    break
                if asyncio.get_running_loop().time() > deadline:
                    raise
        return reply.states

    async def acquire(self, req: Request, keep_alive: float | None) -> None:
        """Before a request reaches its model's engine: the model manager loads the model if
        it is not loaded (the request waits, bounded) and keeps it loaded until `release`."""
        if self.manager is None or req.path in _NO_ENGINE_PATHS:
            return
        state = req.state
        i = self.states.index(state)
        if self._waiting[i] >= MAX_LOAD_WAITERS:
            raise overloaded(f"{MAX_LOAD_WAITERS} requests already wait for {state.model_name} "
                             "to load; try again shortly", retry_after_s=5)
        self._waiting[i] += 1
        try:
            reply = await self.manager.ask("ensure", i, LOAD_TIMEOUT_S)
        finally:
            self._waiting[i] -= 1
        if reply.error:
            raise _refused(reply)
        self._leases[id(req)] = (i, keep_alive)
        if state.engine.dead:  # just loaded: the engine client reconnects within 0.5 s
            await state.engine.wait_alive(LOAD_TIMEOUT_S)

    @contextlib.asynccontextmanager
    async def holding(self, state: AppState) -> AsyncIterator[None]:
        """A WS /v1/realtime session: its model is loaded first and kept until it ends."""
        if self.manager is None:
            yield
            return
        i = self.states.index(state)
        reply = await self.manager.ask("ensure", i, LOAD_TIMEOUT_S)
        if reply.error:
            logger.warning("realtime session: %s", reply.error)
            yield  # the session reports the model's engine as not running
            return
        try:
            if state.engine.dead:
                await state.engine.wait_alive(LOAD_TIMEOUT_S)
            yield
        finally:
            await self.manager.tell("end", i)

    def release(self, req: Request) -> None:
        """The request is over: its model may go idle (and unload after its timeout). Sent
        from a task of its own: this runs in the request's `finally`, maybe while cancelled."""
        self._end(self._leases.pop(id(req), None))

    def detach(self, req: Request) -> Callable[[], None]:
        """A run that outlives its request (a background /v1/responses run): the request's
        lease moves to the returned callable, which the run calls when it ends, so the model is
        not idle (evictable, unloadable) while it still generates."""
        lease = self._leases.pop(id(req), None)
        return lambda: self._end(lease)

    def _end(self, lease: tuple[int, float | None] | None) -> None:
        if lease is not None and self.manager is not None:
            task = asyncio.ensure_future(self.manager.tell("end", *lease))
            self._telling.add(task)
            task.add_done_callback(self._telling.discard)

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
        if path not in _AUDIO_PATHS and path not in _JSON_PATHS:
            return
        fields = router_fields(path, await _router_body(req), req.headers.get("content-type"))
        name, generate = fields.model, fields.generate
        keep_alive = keep_alive_seconds(fields.keep_alive)
        if path == "/invocations" and not name:
            req.state = self.first("generate" if generate else "pooling")
            await self.acquire(req, keep_alive)
            return
        req.state = self.find(name) if name else self.default_for(path)
        if serves(req.state, path, generate):  # else its 501 comes without loading the model
            await self.acquire(req, keep_alive)

    def default_for(self, path: str) -> AppState:
        """The model a request without `model` goes to: the first that serves its route."""
        if path in _POOLING_PATHS:
            return self.first("pooling")
        if path in _AUDIO_PATHS or path == "/v1/realtime":
            return self.first("transcription")
        if path in _GENERATE_PATHS or path in _TEXT_PATHS or path == "/health_generate":
            return self.first("generate")
        return self.primary


async def _router_body(req: Request) -> bytes:
    """The body the router reads, under its route's usual limit (the audio routes': the form's,
    kept for the handler); b"" for an audio form declared over that limit: its handler answers
    413 before reading it."""
    if req.path not in _AUDIO_PATHS:
        return await req.body()
    from fornax.api.routes.audio import _FORM_SLACK_BYTES, max_audio_bytes

    limit = max(max_audio_bytes(req.state) + _FORM_SLACK_BYTES,
                req.state.settings.max_request_body_bytes)
    declared = req.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return b""
    return await req.body(limit=limit)
