"""Internal sub-requests: run a body through another route's handler in-process (SageMaker's
dispatch, Anthropic's count_tokens) and read its JSON answer back (API workers).

Surfaces that answer with generated text (Anthropic Messages, Responses, batch chat) do not come
through here: they call the chat path's typed entry, `chat.run_chat`, and read its structs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from fornax.api.server.errors import APIError
from fornax.api.server.http import Request, Response, StreamingResponse

Handler = Callable[[Request], Awaitable[Response]]


def subrequest(req: Request, path: str, body: dict[str, Any], *, detached: bool = False
               ) -> Request:
    """A request for `path` carrying `body`, sharing `req`'s connection and state.

    Its disconnect watch is the outer request's (a client that goes away aborts the generation),
    or nothing when `detached` (background work that outlives the HTTP request)."""
    inner = Request(req.scope, req.receive, req.state)
    inner.path = path
    inner.method = "POST"
    inner.request_id = req.request_id
    inner._body = msgspec.json.encode(body)
    if detached:
        inner.watch_disconnect = lambda: None  # type: ignore[method-assign]
    else:
        inner.watch_disconnect = req.watch_disconnect  # type: ignore[method-assign]
    return inner


def _error_from(obj: Any, status: int = 500) -> APIError:
    err = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(err, dict):
        return APIError(status, "internal server error")
    code = err.get("code")
    return APIError(code if isinstance(code, int) and 400 <= code < 600 else status,
                    str(err.get("message", "error")), err.get("param"))


async def call_json(handler: Handler, inner: Request) -> dict[str, Any]:
    """Run a non-streaming sub-request; its JSON body, or its error raised as an APIError."""
    response = await handler(inner)
    if isinstance(response, StreamingResponse):
        with contextlib.suppress(Exception):
            await response.chunks.aclose()  # type: ignore[attr-defined]
        raise APIError(500, "internal error: a streamed answer where JSON was expected")
    obj = msgspec.json.decode(response.body) if response.body else {}
    if response.status != 200:
        raise _error_from(obj, response.status)
    return obj
