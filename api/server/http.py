"""Minimal ASGI request/response types: bounded bodies, JSON, SSE, disconnects (API workers)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs

import msgspec

from fornax.api.protocol.fields import check_json_fields
from fornax.api.server.api_keys import presented_key
from fornax.api.server.errors import APIError, from_validation_error
from fornax.runtime.limits import MAX_JSON_DEPTH, json_too_deep

if TYPE_CHECKING:
    from fornax.api.server.state import AppState

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
T = TypeVar("T")

_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


class ClientDisconnected(Exception):
    """The client went away before the response was sent; nothing more is sent."""


class Request:
    """One HTTP request: its scope, headers, body (read once, size-limited) and disconnects."""

    def __init__(self, scope: Scope, receive: Receive, state: AppState) -> None:
        self.scope = scope
        self.receive = receive
        self.state = state
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers: dict[str, str] = {k.decode("latin-1").lower(): v.decode("latin-1")
                                        for k, v in scope.get("headers", [])}
        self.path_params: dict[str, str] = {}
        self.request_id: str | None = self.headers.get("x-request-id")
        self._body: bytes | None = None
        self._body_started = False
        self._depth_checked = False  # the JSON depth scan runs once per body
        self.client_gone = False
        self._watcher: asyncio.Task[None] | None = None

    @property
    def presented_key(self) -> str | None:
        """The API key the client sent: `Authorization: Bearer <key>`, else `x-api-key: <key>`
        (Anthropic clients); None when it sent neither."""
        return presented_key(self.headers)

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(self.scope.get("query_string", b"").decode("latin-1"))

    async def body(self, limit: int | None = None) -> bytes:
        """The whole body; 413 beyond `limit` (default: --max-request-body-bytes)."""
        if self._body is not None:
            return self._body
        self._body_started = True
        limit = limit or self.state.settings.max_request_body_bytes
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.client_gone = True
                raise ClientDisconnected()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        self._body = b"".join(chunks)
        return self._body

    async def discard_unread_body(self) -> bool:
        """Before an early refusal (401, 404, 501...): read and drop a body nobody read, up to
        the body limit, so the client sees the answer instead of a reset connection. False when
        the body is larger than the limit (the connection must then be closed)."""
        if self._body_started or self.method in ("GET", "HEAD", "OPTIONS"):
            return True
        self._body_started = True
        limit = self.state.settings.max_request_body_bytes
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return False
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.client_gone = True
                return False
            size += len(message.get("body", b""))
            if size > limit:
                return False
            if not message.get("more_body", False):
                return True

    async def json(self, type_: type[T]) -> T:
        """Decode the body into a protocol struct; 400 naming the field on bad input."""
        body = await self.body()
        if not body.strip():
            raise APIError(400, "the request body is empty; a JSON object is expected")
        if not self._depth_checked:
            check_json_depth(body)
            self._depth_checked = True
        decoder = _decoders.get(type_)
        if decoder is None:
            decoder = _decoders[type_] = msgspec.json.Decoder(type_)
        try:
            value = decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise from_validation_error(exc) from None
        except RecursionError:
            raise _too_deep() from None
        check_json_fields(type_, body)  # vLLM's refused fields: 400; unknown ones: one warning
        return value

    async def json_value(self) -> Any:
        """The body as plain JSON values (for routes that dispatch on its shape), under the same
        size and depth limits as `json`; None for an empty body."""
        body = await self.body()
        if not body.strip():
            return None
        if not self._depth_checked:
            check_json_depth(body)
            self._depth_checked = True
        try:
            return msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise _too_deep() from None

    def watch_disconnect(self) -> None:
        """After the body is read: cancel this request's task when the client goes away."""
        task = asyncio.current_task()
        if self._watcher is not None or task is None:
            return

        async def watch() -> None:
            while True:
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    self.client_gone = True
                    task.cancel()
                    return

        self._watcher = asyncio.create_task(watch())

    def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None


def check_json_depth(body: bytes) -> None:
    """400 when arrays/objects nest deeper than MAX_JSON_DEPTH: every JSON route passes here
    (through `Request.json` / `Request.json_value`) before decoding."""
    if json_too_deep(body, MAX_JSON_DEPTH):
        raise _too_deep()


def _too_deep() -> APIError:
    return APIError(400, f"the request JSON nests arrays/objects deeper than {MAX_JSON_DEPTH} "
                    "levels")


def _too_large(limit: int) -> APIError:
    # the unread rest of the body makes the connection unusable: close it after answering
    return APIError(413, f"the request body is larger than the limit of {limit} bytes",
                    headers={"connection": "close"})


class Response:
    """A complete response body."""

    def __init__(self, body: bytes = b"", status: int = 200,
                 content_type: str | None = "application/json",
                 headers: dict[str, str] | None = None) -> None:
        self.body = body
        self.status = status
        self.content_type = content_type
        self.headers = dict(headers or {})

    def raw_headers(self, extra: dict[str, str]) -> list[tuple[bytes, bytes]]:
        headers = {**self.headers, **extra}
        if self.content_type:
            headers["content-type"] = self.content_type
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def send(self, send: Send, extra_headers: dict[str, str],
                   before_end: Callable[[], None] | None = None) -> None:
        if before_end is not None:
            before_end()
        await send({"type": "http.response.start", "status": self.status,
                    "headers": self.raw_headers({**extra_headers,
                                                 "content-length": str(len(self.body))})})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(obj), status, headers=headers)


def error_response(error: APIError) -> Response:
    return Response(error.body(), error.status, headers=error.headers)


class StreamingResponse(Response):
    """Server-sent events from an async iterator of already framed chunks."""

    def __init__(self, chunks: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        super().__init__(b"", 200, "text/event-stream", headers)
        self.headers.setdefault("cache-control", "no-cache")
        self.chunks = chunks

    async def send(self, send: Send, extra_headers: dict[str, str],
                   before_end: Callable[[], None] | None = None) -> None:
        await send({"type": "http.response.start", "status": self.status,
                    "headers": self.raw_headers(extra_headers)})
        async for chunk in self.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if before_end is not None:
            before_end()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def sse(obj: Any) -> bytes:
    """One SSE `data:` event holding the JSON of `obj`."""
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
