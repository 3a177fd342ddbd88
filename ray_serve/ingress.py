"""The OpenAI-compatible front of the Ray application: reads each request's `model`, hands it to
that model's deployment and streams the answer back (Ray Serve ingress replica, behind Ray's HTTP
proxy). `/v1/models`, `/health` and `/metrics` gather every model (and, for /metrics, every
replica); `WS /v1/realtime` is relayed to one replica's child (realtime.py).
"""

# no `from __future__ import annotations` here: FastAPI reads the route methods' parameter types
# at run time, and Ray Serve's class ingress rebinds them, so they must be real classes

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle

from fornax.api.server.api_keys import key_matches, presented_key, server_keys, unauthorized
from fornax.api.server.errors import APIError, overloaded
from fornax.api.server.http import sse
from fornax.api.server.model_set import _AUDIO_PATHS, _POOLING_PATHS, not_found, router_fields
from fornax.ray_serve.metrics import merge
from fornax.runtime.limits import RAY_INGRESS_BODY_BYTES

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-fornax-replica"  # which replica answered (its Ray Serve replica id)
_RETRY_SLEEP_S = 0.25
_HEALTH_WAIT_S = 5.0  # a model whose request waits longer for a replica is unhealthy
_LIST_WAIT_S = 30.0  # GET /v1/models: 503 rather than a hang while a model has no replica
_QUERY_MODEL_POSTS = frozenset({"/sleep", "/wake_up", "/reset_prefix_cache"})
_REQUEST_DROP = frozenset({"host", "content-length", "transfer-encoding", "connection",
                           "keep-alive", "upgrade", "te"})
_METHODS = ["GET", "HEAD", "POST", "DELETE", "PUT", "PATCH", "OPTIONS"]

app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@dataclass
class ModelRoute:
    """One model of the application, as the ingress sees it."""

    names: list[str]
    handle: DeploymentHandle
    retry_s: float  # how long a request that never reached an engine is retried


def error(exc: APIError) -> Response:
    return Response(exc.body(), exc.status, headers=exc.headers,
                    media_type="application/json")


def _headers(request: Request) -> list[tuple[str, str]]:
    return [(k, v) for k, v in request.headers.items() if k.lower() not in _REQUEST_DROP]


async def _rest(stream: Any, method: str, path: str, events: bool) -> AsyncIterator[bytes]:
    """The body's chunks after the head; a replica lost mid-answer ends the stream (an SSE
    stream with an error event, as `fornax serve` ends a stream that failed, so a client can
    tell it from a complete answer)."""
    try:
        async for chunk in stream:
            yield chunk
    except Exception as exc:  # noqa: BLE001 - Ray's errors or the replica's own: the head is sent
        logger.warning("%s %s: replica lost mid-answer: %r", method, path, exc)
        if events:
            yield sse(APIError(503, "the model replica serving this stream was lost; the "
                                    "answer is incomplete").to_response())


@serve.ingress(app)
class Ingress:
    """Routes by `model` to one deployment handle per model. With API keys, every route but
    `fornax serve`'s public ones (health, ping, version, docs) needs one before anything else,
    so no model lookup (its 404) answers a client without a key."""

    def __init__(self, models: list[tuple[list[str], DeploymentHandle, float]],
                 api_keys: list[str] | None = None) -> None:
        self._keys = [k.encode() for k in server_keys(api_keys)]
        self.models = [ModelRoute(names, handle, retry) for names, handle, retry in models]
        self.by_name: dict[str, ModelRoute] = {}
        for model in self.models:
            for name in model.names:
                self.by_name.setdefault(name, model)
        self._runners: dict[int, str] = {}

    # ---- API keys (the same rule and check as `fornax serve`: api/server/api_keys.py) ---------
    def _refused(self, path: str, headers: Any, given: str | None = None) -> bool:
        """Whether a request must be refused for want of a valid API key."""
        from fornax.api.server.app import PUBLIC_PATHS

        if not self._keys or path in PUBLIC_PATHS:
            return False
        given = given if given is not None else presented_key(headers)
        return given is None or not key_matches(given, self._keys)

    # ---- which model -------------------------------------------------------------------------
    async def _runner(self, model: ModelRoute) -> str:
        key = id(model)
        if key not in self._runners:
            info = await model.handle.describe.remote()
            self._runners[key] = str(info.get("runner", "generate"))
        return self._runners[key]

    async def _default_for(self, path: str) -> ModelRoute:
        """As `fornax serve` with several models: the first model serving the route."""
        if len(self.models) == 1:
            return self.models[0]
        want = ("pooling" if path in _POOLING_PATHS else
                "transcription" if path in _AUDIO_PATHS or path == "/v1/realtime" else
                "generate")
        for model in self.models:
            if await self._runner(model) == want:
                return model
        return self.models[0]

    async def pick(self, method: str, path: str, query_model: str | None, body: bytes,
                   content_type: str | None) -> ModelRoute:
        name = query_model
        if method == "POST" and path not in _QUERY_MODEL_POSTS:
            name = router_fields(path, body, content_type).model
        elif path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):].removesuffix("/load").removesuffix("/unload")
        if name:
            found = self.by_name.get(name)
            if found is None:
                raise not_found(name)
            return found
        return await self._default_for(path)

    # ---- one request through one deployment ----------------------------------------------------
    async def call(self, model: ModelRoute, method: str, path: str, query: str,
                   headers: list[tuple[str, str]], body: bytes) -> Response:
        """The model's answer, streamed: 503 + Retry-After past its queue bound or when its
        replica died; a request that never reached an engine is retried for `retry_s`."""
        deadline = time.monotonic() + model.retry_s
        while True:
            stream: Any = model.handle.options(stream=True).forward.remote(
                method, path, query, headers, body)
            try:
                first = await stream.__anext__()
            except BackPressureError as exc:
                return error(overloaded(f"every replica of this model is busy and its queue is "
                                        f"full ({exc.message if hasattr(exc, 'message') else exc})"
                                        "; try again shortly", retry_after_s=1))
            except (RayActorError, RayServeException) as exc:
                logger.warning("%s %s: replica failed: %r", method, path, exc)
                return error(overloaded("the model replica serving this request failed; try "
                                        "again", retry_after_s=1))
            except StopAsyncIteration:
                return error(overloaded("the model replica closed the request", 1))
            except Exception:  # noqa: BLE001 - a fault in the replica: JSON 503, not a bare 500
                logger.exception("%s %s: the replica raised", method, path)
                return error(overloaded("the model replica failed on this request; try again",
                                        retry_after_s=1))
            if first["unsent"] and time.monotonic() < deadline:
                stream.cancel()
                await asyncio.sleep(_RETRY_SLEEP_S)
                continue
            break
        if first["unsent"]:
            return error(overloaded("no replica of this model is running; Ray is replacing it",
                                    retry_after_s=1))
        headers_out = dict(first["headers"])
        headers_out[REPLICA_HEADER] = first["replica"]
        events = "text/event-stream" in headers_out.get("content-type", "")
        return StreamingResponse(_rest(stream, method, path, events), status_code=first["status"],
                                 headers=headers_out)

    # ---- routes --------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        if self._refused("/v1/models", request.headers):
            return error(unauthorized())
        data: list[Any] = []
        for model in self.models:
            try:
                answer = await asyncio.wait_for(
                    self._whole(model, "GET", "/v1/models", "", _headers(request)),
                    _LIST_WAIT_S)
            except asyncio.TimeoutError:  # no running replica: it waited in Ray's queue
                return error(overloaded(f"no replica of {model.names[0]} answered within "
                                        f"{_LIST_WAIT_S:g} s; Ray is starting one",
                                        retry_after_s=1))
            if answer[0] != 200:
                return Response(answer[2], answer[0], media_type="application/json")
            data += json.loads(answer[2]).get("data", [])
        return Response(json.dumps({"object": "list", "data": data}),
                        media_type="application/json")

    @app.get("/health")
    async def health(self, request: Request) -> Response:
        """200 when every model has a replica whose child answers /health (503 when one has no
        running replica: its request would wait in Ray's queue)."""
        for model in self.models:
            try:
                status, _, _ = await asyncio.wait_for(
                    self._whole(model, "GET", "/health", "", _headers(request)), _HEALTH_WAIT_S)
            except asyncio.TimeoutError:
                status = 503
            if status != 200:
                return Response(b"", 503)
        return Response(b"", 200)

    @app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """Every replica's metrics, each sample labelled with its replica."""
        if self._refused("/metrics", request.headers):
            return error(unauthorized())
        texts: list[tuple[str, str]] = []
        for model in self.models:
            found = await model.handle.broadcast("metrics_text", _headers(request)).results_async(
                timeout_s=30, return_exceptions=True)
            for item in found:
                if isinstance(item, BaseException):
                    logger.warning("/metrics: a replica did not answer: %r", item)
                    continue
                replica, status, text = item
                if status in (401, 403):
                    return Response(text, status, media_type="application/json")
                if status == 200:
                    texts.append((replica, text))
        return Response(merge(texts), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.websocket("/v1/realtime")
    async def realtime(self, websocket: WebSocket) -> None:
        from fornax.api.realtime.routes import REALTIME_PATH, offered_key
        from fornax.ray_serve.realtime import relay

        if self._refused(REALTIME_PATH, {}, offered_key(dict(websocket.scope)) or ""):
            await websocket.close(1008, "a valid API key is required")
            return
        name = websocket.query_params.get("model")
        try:
            model = (self.by_name[name] if name in self.by_name else
                     await self._default_for("/v1/realtime"))
        except Exception:  # noqa: BLE001 - the session closes with a reason instead
            logger.exception("realtime: no speech model")
            await websocket.close(1011)
            return
        if name and name not in self.by_name:
            await websocket.close(1008, f"The model `{name}` does not exist.")
            return
        await relay(websocket, model.handle)

    @app.api_route("/{path:path}", methods=_METHODS)
    async def forward(self, request: Request, path: str) -> Response:
        path = "/" + path
        preflight = request.method == "OPTIONS" and \
            "access-control-request-method" in request.headers  # the child's CORS answers it
        if not preflight and self._refused(path, request.headers):
            return error(unauthorized())
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > RAY_INGRESS_BODY_BYTES:
            return error(APIError(413, f"the request body is over {RAY_INGRESS_BODY_BYTES} "
                                  "bytes"))
        received = bytearray()  # not bytes +=: a 64 MiB body in small chunks was quadratic
        async for chunk in request.stream():
            received += chunk
            if len(received) > RAY_INGRESS_BODY_BYTES:
                return error(APIError(413, f"the request body is over "
                                      f"{RAY_INGRESS_BODY_BYTES} bytes"))
        body = bytes(received)
        try:
            model = await self.pick(request.method, path, request.query_params.get("model"),
                                    body, request.headers.get("content-type"))
        except APIError as exc:
            return error(exc)
        return await self.call(model, request.method, path, request.url.query,
                               _headers(request), body)

    async def _whole(self, model: ModelRoute, method: str, path: str, query: str,
                     headers: list[tuple[str, str]]) -> tuple[int, dict[str, str], bytes]:
        """A short answer read whole (GET /v1/models, /health)."""
        response = await self.call(model, method, path, query, headers, b"")
        if not isinstance(response, StreamingResponse):
            return response.status_code, dict(response.headers), bytes(response.body)
        body = b""
        async for chunk in response.body_iterator:
            body += chunk if isinstance(chunk, bytes) else str(chunk).encode()
        return response.status_code, dict(response.headers), body

