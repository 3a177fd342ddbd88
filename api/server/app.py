"""The ASGI app: one route table, API keys, CORS, request ids, errors, lifespan (API workers).

Granian loads `fornax.api.server.app:create_app` (a factory) in every worker; the settings come from
the environment set by `fornax serve`. This module must not import torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fornax.api.engine.client import DEADLINE_HEADER, REQUEST_DEADLINE, request_deadline
from fornax.api.realtime import routes as realtime
from fornax.api.realtime import shutdown as realtime_shutdown
from fornax.api.responses import routes as responses
from fornax.api.routes import (
    anthropic,
    audio,
    batch,
    chat,
    completions,
    dev,
    embeddings,
    models,
    render,
    sagemaker,
    scoring,
    system,
    tokenization,
)
from fornax.api.routes.pooling_common import check_route_runner
from fornax.api.server import docs_page, openapi
from fornax.api.server.api_keys import key_matches, unauthorized
from fornax.api.server.errors import APIError
from fornax.api.server.http import (
    ClientDisconnected,
    Receive,
    Request,
    Response,
    Scope,
    Send,
    error_response,
)
from fornax.api.server.model_set import build_states
from fornax.api.server.settings import ServerSettings, settings_from_env
from fornax.api.server.state import AppState
from fornax.runtime.limits import request_id_problem

logger = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    methods: tuple[str, ...]
    path: str  # exact, or ending in "{name}" which captures the rest of the path
    handler: Handler
    public: bool = False  # reachable without an API key
    dev: bool = False  # exists only with --enable-dev-endpoints (404 otherwise)
    switch: str = ""  # a ServerSettings flag that must be on for it to exist (404 otherwise)
    docs: bool = False  # gone with --disable-fastapi-docs (404), as vLLM's /docs, /openapi.json

    def enabled(self, settings: ServerSettings) -> bool:
        """Whether this route exists on a server with these settings."""
        return ((not self.dev or settings.enable_dev_endpoints)
                and (not self.switch or bool(getattr(settings, self.switch)))
                and not (self.docs and settings.disable_fastapi_docs))

    def match(self, path: str) -> dict[str, str] | None:
        if "{" not in self.path:
            return {} if path == self.path else None
        prefix, name = self.path.split("{", 1)
        if path.startswith(prefix) and len(path) > len(prefix):
            return {name.rstrip("}"): path[len(prefix):]}  # ASGI paths arrive decoded
        return None


ROUTES: tuple[Route, ...] = (
    Route(("GET",), "/v1/models", models.list_models),
    Route(("GET",), "/v1/models/{model}", models.get_model),
    Route(("POST",), "/v1/models/{rest}", models.model_action),  # {id}/load, {id}/unload
    Route(("POST",), "/v1/chat/completions", chat.chat_completions),
    Route(("POST",), "/v1/chat/completions/batch", batch.chat_batch),
    Route(("POST",), "/v1/completions", completions.completions),
    Route(("POST",), "/v1/responses", responses.create_response),
    Route(("GET",), "/v1/responses/{rest}", responses.get_response),
    Route(("DELETE",), "/v1/responses/{rest}", responses.delete_response),
    Route(("POST",), "/v1/responses/{rest}", responses.cancel_response),
    Route(("POST",), "/v1/messages", anthropic.messages),
    Route(("POST",), "/v1/messages/count_tokens", anthropic.count_tokens),
    Route(("POST",), "/v1/embeddings", embeddings.embeddings),
    Route(("POST",), "/v2/embed", embeddings.cohere_embed),
    Route(("POST",), "/pooling", embeddings.pooling),
    Route(("POST",), "/classify", scoring.classify),
    Route(("POST",), "/score", scoring.score),
    Route(("POST",), "/v1/score", scoring.score),
    Route(("POST",), "/rerank", scoring.rerank),
    Route(("POST",), "/v1/rerank", scoring.rerank),
    Route(("POST",), "/v2/rerank", scoring.rerank),
    Route(("POST",), "/v1/audio/transcriptions", audio.transcriptions),
    Route(("POST",), "/v1/audio/translations", audio.translations),
    Route(("POST",), "/v1/chat/completions/render", render.render_chat),
    Route(("POST",), "/v1/completions/render", render.render_completion),
    Route(("POST",), "/tokenize", tokenization.tokenize),
    Route(("POST",), "/detokenize", tokenization.detokenize),
    Route(("POST",), "/v1/tokenize", tokenization.tokenize),  # Olla's vLLM profile routes these
    Route(("POST",), "/v1/detokenize", tokenization.detokenize),
    Route(("GET",), "/tokenizer_info", tokenization.tokenizer_info,
          switch="enable_tokenizer_info_endpoint"),
    Route(("GET",), "/get_tokenizer_info", tokenization.tokenizer_info,
          switch="enable_tokenizer_info_endpoint"),
    Route(("POST",), "/invocations", sagemaker.invocations),
    Route(("GET",), "/health", system.health, public=True),
    Route(("GET",), "/health_generate", system.health_generate),  # SGLang's; runs the engine
    Route(("GET", "POST"), "/ping", system.ping, public=True),
    Route(("GET",), "/version", system.version, public=True),
    Route(("GET",), "/load", system.load),
    Route(("GET",), "/metrics", system.metrics),
    Route(("GET",), "/openapi.json", openapi.openapi_json, public=True,  # shapes, no secret
          docs=True),
    Route(("GET",), "/docs", docs_page.docs, public=True, docs=True),
    Route(("POST",), "/sleep", dev.sleep, dev=True),
    Route(("POST",), "/wake_up", dev.wake_up, dev=True),
    Route(("GET",), "/is_sleeping", dev.is_sleeping, dev=True),
    Route(("POST",), "/reset_prefix_cache", dev.reset_prefix_cache, dev=True),
)
PUBLIC_PATHS = frozenset(r.path for r in ROUTES if r.public)


def _handler_name(path: str) -> str:
    """The route template a path matched (http_* metrics' handler label), "none" if none."""
    for route in ROUTES:
        if route.match(path) is not None:
            return route.path
    return "none"
_CORS_METHODS = "GET, POST, OPTIONS"


class FornaxApp:
    """The raw ASGI application of one API worker."""

    def __init__(self, settings: ServerSettings | None = None) -> None:
        self._settings = settings
        self.state: AppState | None = None
        self._keys = [k.encode() for k in (settings.api_keys if settings else [])]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":  # WS /v1/realtime (any other path is closed with 1008)
            if self.state is None:
                await self.startup()
            assert self.state is not None  # many models: the first speech model
            speech = self.state.models.default_for(realtime.REALTIME_PATH)
            key = realtime.offered_key(scope)  # many models: an allowed session loads its model
            allowed = not self._keys or (key is not None and self._key_ok(key))
            async with (self.state.models.holding(speech) if allowed
                        else contextlib.nullcontext()):
                await realtime.websocket_endpoint(speech, scope, receive, send,
                                                  self._key_ok if self._keys else None,
                                                  self._origin_allowed)

    # ---- lifespan ------------------------------------------------------------------------------
    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    logger.exception("API worker failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.state is not None:
                    self.state.draining = True
                    await self.state.models.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        multiprocessing.current_process().name = f"APIWorker-{os.getpid()}"
        settings = self._settings or settings_from_env()
        self._keys = [k.encode() for k in settings.api_keys]
        models = build_states(settings)  # one AppState per served model
        await models.start()
        self.state = models.primary

    # ---- http ----------------------------------------------------------------------------------
    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        if state is None:  # no lifespan support: start lazily
            await self.startup()
            state = self.state
        assert state is not None
        req = Request(scope, receive, state)
        started = time.monotonic()
        extra = self._cors_headers(req)
        bad_id = _refuse_request_id(req)  # before any work; an unsafe id is never echoed
        if req.request_id:
            extra["x-request-id"] = req.request_id
        try:
            response = _error_response(req, bad_id) if bad_id else \
                await self._dispatch(req, extra)
            if response is None:
                return
            if response.status >= 400 and not await req.discard_unread_body():
                response.headers["connection"] = "close"
            await response.send(send, extra, before_end=req.stop_watching)
            state.metrics.observe_http(_handler_name(req.path), req.method, response.status,
                                       time.monotonic() - started)
        except (ClientDisconnected, asyncio.CancelledError):
            if not req.client_gone:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        except OSError as exc:  # the connection broke while sending
            logger.debug("sending the response failed: %s", exc)
        finally:
            req.stop_watching()
            state.models.release(req)  # many models: this request no longer holds its model

    async def _dispatch(self, req: Request, extra: dict[str, str]) -> Response | None:
        try:
            if req.method == "OPTIONS" and "access-control-request-method" in req.headers \
                    and self.state and self.state.settings.allowed_origins:
                return self._preflight(req, extra)
            if req.path not in PUBLIC_PATHS and self._keys and not self._authorized(req):
                raise unauthorized()
            handler, params = self._route(req)
            await req.state.models.select(req)  # many models: the one the request names
            check_route_runner(req)  # generation routes on a pooling model: 501
            REQUEST_DEADLINE.set(request_deadline(req.headers.get(DEADLINE_HEADER),
                                                  req.state.settings.request_timeout_s))
            req.path_params = params
            return await handler(req)
        except APIError as exc:
            return _error_response(req, exc)
        except (ClientDisconnected, asyncio.CancelledError):
            raise
        except Exception:
            logger.exception("unhandled error on %s %s", req.method, req.path)
            return _error_response(req, APIError(500, "internal server error"))

    def _route(self, req: Request) -> tuple[Handler, dict[str, str]]:
        allowed: list[str] = []
        settings = req.state.settings
        for route in ROUTES:
            params = route.match(req.path)
            if params is None or not route.enabled(settings):
                continue
            if req.method in route.methods:
                return route.handler, params
            allowed.extend(route.methods)
        if allowed:
            raise APIError(405, f"method {req.method} is not allowed on {req.path}",
                           headers={"allow": ", ".join(sorted(set(allowed)))})
        raise APIError(404, f"no route {req.path}")

    def _authorized(self, req: Request) -> bool:
        given = req.presented_key
        return given is not None and self._key_ok(given)

    def _key_ok(self, given: bytes | str) -> bool:
        return key_matches(given, self._keys)

    # ---- CORS (closed unless --allowed-origins) --------------------------------------------------
    def _origin_allowed(self, origin: str | None) -> bool:
        allowed = self.state.settings.allowed_origins if self.state else []
        return bool(origin) and ("*" in allowed or origin in allowed)

    def _cors_headers(self, req: Request) -> dict[str, str]:
        origin = req.headers.get("origin")
        if not self._origin_allowed(origin):
            return {}
        assert origin is not None
        return {"access-control-allow-origin": origin, "vary": "Origin",
                "access-control-expose-headers": "x-request-id"}

    def _preflight(self, req: Request, extra: dict[str, str]) -> Response:
        if not extra:
            raise APIError(403, "this origin is not allowed (--allowed-origins)")
        asked = req.headers.get("access-control-request-headers", "")
        return Response(b"", 204, content_type=None, headers={
            "access-control-allow-methods": _CORS_METHODS,
            "access-control-allow-headers": asked or "authorization, content-type",
            "access-control-max-age": "600"})


def _refuse_request_id(req: Request) -> APIError | None:
    """A 400 for an x-request-id header that cannot be echoed safely (too long, control
    characters, non-ASCII); the request then carries no id."""
    if req.request_id is None or not req.request_id.strip():
        req.request_id = None  # an empty header (proxies send them) is no id, not an error
        return None
    problem = request_id_problem(req.request_id)
    if problem is None:
        return None
    req.request_id = None
    return APIError(400, f"the x-request-id header is refused: {problem}", "x-request-id")


def _error_response(req: Request, exc: APIError) -> Response:
    """OpenAI's error shape, or Anthropic's on the /v1/messages routes."""
    if req.path.startswith("/v1/messages"):
        return anthropic.error_response(exc)
    return error_response(exc)


def create_app() -> Any:
    """Granian's app factory (`fornax.api.server.app:create_app`), called in each worker before
    Granian sets up the worker's signals: a stop closes realtime sessions first."""
    realtime_shutdown.install_worker_hook()
    return FornaxApp()
