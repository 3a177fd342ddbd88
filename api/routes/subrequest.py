"""Internal sub-requests: run a translated body through another route's handler and read its JSON
or SSE events back; split chat deltas into output blocks (API workers).

The Anthropic Messages, Responses, SageMaker and batch-chat surfaces are translations of the chat
API (as in vLLM): they build a chat body, run `chat.chat_completions` on it in-process and convert
what comes back. Everything chat does (templates, sampling, structured output, tool and reasoning
parsing) is therefore shared, not duplicated.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
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


async def open_stream(handler: Handler, inner: Request) -> AsyncIterator[dict[str, Any]]:
    """Start a streaming sub-request (refusals raise here, before any byte is sent) and return
    its SSE events as dicts; an error event is raised as an APIError, `[DONE]` ends it."""
    response = await handler(inner)
    if not isinstance(response, StreamingResponse):
        obj = msgspec.json.decode(response.body) if response.body else {}
        raise _error_from(obj, response.status if response.status != 200 else 500)
    return _events(response.chunks)


async def _events(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    buffer = b""
    try:
        async for chunk in chunks:
            buffer += chunk
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                for line in block.split(b"\n"):
                    if not line.startswith(b"data: "):
                        continue
                    data = line[len(b"data: "):]
                    if data.strip() == b"[DONE]":
                        return
                    obj = msgspec.json.decode(data)
                    if "error" in obj and "choices" not in obj:
                        raise _error_from(obj)
                    yield obj
    finally:
        with contextlib.suppress(Exception):
            await chunks.aclose()  # type: ignore[attr-defined]


# ---- chat output -> blocks (text, reasoning, tool calls) ------------------------------------


@dataclass
class Block:
    """One output block: text, reasoning, or a tool call whose `text` is its argument JSON."""

    kind: str  # "text" | "reasoning" | "tool_call"
    index: int  # position among this answer's blocks
    text: str = ""
    call_id: str = ""
    name: str = ""
    key: Any = None
    item_id: str = ""  # set by the surfaces that give blocks ids (Responses' output items)

    def arguments(self) -> dict[str, Any]:
        """A tool call's arguments as an object ({} when the model wrote no valid JSON object)."""
        try:
            value = json.loads(self.text) if self.text.strip() else {}
        except json.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}


def _reasoning_of(obj: dict[str, Any]) -> str | None:
    value = obj.get("reasoning")
    if value is None:
        value = obj.get("reasoning_content")
    return value if isinstance(value, str) else None


def blocks_of_message(message: dict[str, Any]) -> list[Block]:
    """A complete chat message -> its blocks: reasoning, text, then each tool call."""
    blocks: list[Block] = []
    reasoning = _reasoning_of(message)
    if reasoning:
        blocks.append(Block("reasoning", len(blocks), reasoning))
    content = message.get("content")
    if isinstance(content, str) and content:
        blocks.append(Block("text", len(blocks), content))
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        blocks.append(Block("tool_call", len(blocks), fn.get("arguments") or "",
                            call.get("id") or "", fn.get("name") or ""))
    return blocks


class ChatDeltaReader:
    """Turns chat.completion.chunk events (choice 0) into block starts, deltas and stops.

    `feed` returns ("start", block, ""), ("delta", block, text) and ("stop", block, "") events in
    order; one block is open at a time (a new kind or a new tool-call index closes the open one).
    """

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.open: Block | None = None
        self.finish_reason: str | None = None
        self.stop_reason: Any = None
        self.usage: dict[str, Any] | None = None

    def feed(self, chunk: dict[str, Any]) -> list[tuple[str, Block, str]]:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        events: list[tuple[str, Block, str]] = []
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = _reasoning_of(delta)
            if reasoning:
                self._add(events, "reasoning", "reasoning", reasoning)
            content = delta.get("content")
            if isinstance(content, str) and content:
                self._add(events, "text", "text", content)
            for call in delta.get("tool_calls") or []:
                fn = call.get("function") or {}
                key = ("tool_call", call.get("index", 0))
                block = self._add(events, "tool_call", key, fn.get("arguments") or "",
                                  call.get("id") or "", fn.get("name") or "")
                block.call_id = block.call_id or call.get("id") or ""
                block.name = block.name or fn.get("name") or ""
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
                self.stop_reason = choice.get("stop_reason")
        return events

    def _add(self, events: list[tuple[str, Block, str]], kind: str, key: Any, text: str,
             call_id: str = "", name: str = "") -> Block:
        block = self.open
        if block is None or block.key != key:
            events.extend(self.close())
            block = Block(kind, len(self.blocks), "", call_id, name, key)
            self.blocks.append(block)
            self.open = block
            events.append(("start", block, ""))
        if text:
            block.text += text
            events.append(("delta", block, text))
        return block

    def close(self) -> list[tuple[str, Block, str]]:
        """Stop the open block (at the end of the answer)."""
        if self.open is None:
            return []
        block, self.open = self.open, None
        return [("stop", block, "")]
