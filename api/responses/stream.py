"""One /v1/responses answer in the making: its state, the response object and the SSE event
sequence (response.created ... response.completed), built from chat chunks (API workers)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from fornax.api.protocol.openai import ChatCompletionChunk, ChatCompletionResponse, UsageInfo
from fornax.api.protocol.responses import ResponsesRequest
from fornax.api.responses.items import (
    assistant_message,
    content_part,
    item_id,
    output_item,
    response_object,
    usage_of,
)
from fornax.api.responses.store import RecordTooLarge, ResponseStore, StoredResponse
from fornax.api.routes.chat_blocks import Block, ChatDeltaReader, blocks_of_message
from fornax.api.server.errors import APIError

logger = logging.getLogger(__name__)

_DELTA_EVENTS = {"text": "response.output_text.delta",
                 "reasoning": "response.reasoning_text.delta",
                 "tool_call": "response.function_call_arguments.delta"}


def sse_event(event: dict[str, Any]) -> bytes:
    """`event: <type>` and `data: <json>`, as OpenAI streams responses."""
    return (b"event: " + event["type"].encode() + b"\ndata: " + msgspec.json.encode(event) +
            b"\n\n")


class ResponseRun:
    """A response's output so far, its status, and how to store it."""

    def __init__(self, store: ResponseStore | None, rid: str, body: ResponsesRequest, model: str,
                 messages: list[dict[str, Any]],
                 count_tokens: Callable[[str], int] | None = None) -> None:
        self.store = store if body.store else None
        self.count_tokens = count_tokens  # reasoning tokens in the usage (re-tokenized text)
        self.rid = rid
        self.body = body
        self.model = model
        self.messages = messages  # the chat conversation so far, without the instructions
        self.created_at = int(time.time())
        self.status = "queued"
        self.reader = ChatDeltaReader()
        self.blocks: list[Block] = []
        self.usage: UsageInfo | None = None
        self.reasoning_tokens = 0
        self.error: dict[str, Any] | None = None
        self.incomplete = False
        self.completed_at: int | None = None
        self.seq = 0
        self.input_items: list[dict[str, Any]] = []
        self.owner = ""  # owner_of(the API key that asked)
        self.unstored = False  # too large for the store: answered with store=false
        self.output_dropped = False  # a background answer too large to store: failed, no output

    # ---- state -----------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.status in ("completed", "incomplete", "failed", "cancelled")

    def snapshot(self) -> dict[str, Any]:
        """The response object now (open items are in_progress)."""
        blocks = [] if self.output_dropped else self.blocks or self.reader.blocks
        output = [output_item(b, "in_progress" if b is self.reader.open else "completed")
                  for b in blocks]
        obj = response_object(self.rid, self.created_at, self.body, self.model,
                              status=self.status, output=output,
                              usage=usage_of(self.usage, self.reasoning_tokens),
                              error=self.error, incomplete=self.incomplete,
                              completed_at=self.completed_at)
        if self.unstored:
            obj["store"] = False
        return obj

    def record(self) -> StoredResponse:
        messages = self.messages
        if self.status in ("completed", "incomplete"):
            messages = [*messages, assistant_message(self.blocks)]
        return StoredResponse(self.snapshot(), messages, float(self.created_at), self.input_items,
                              self.owner)

    async def save(self) -> bool:
        """Store the response now (when `store`); False when it was cancelled meanwhile. An
        answer beyond the store's per-record cap is not stored: a foreground one is answered with
        store=false; a background one (the store is its only way out) is stored failed, without
        its output."""
        if self.store is None:
            return True
        try:
            return await self.store.put(self.rid, self.record())
        except RecordTooLarge as exc:
            logger.warning("response %s is not stored: %s", self.rid, exc)
            if not self.body.background:
                self.store, self.unstored = None, True
                return True
            self.status, self.output_dropped = "failed", True
            self.error = {"code": "response_too_large", "message": str(exc)}
        try:
            return await self.store.put(self.rid, self.record())
        except RecordTooLarge:  # even without its output: leave no stale queued record behind
            await self.store.delete(self.rid, self.owner)
            return True

    def _over_cap(self, block: Block) -> bool:
        """max_tool_calls: a tool call past the cap is dropped from the output."""
        cap = self.body.max_tool_calls
        if cap is None or block.kind != "tool_call":
            return False
        blocks = self.blocks or self.reader.blocks
        return sum(1 for b in blocks[:block.index + 1] if b.kind == "tool_call") > cap

    def finish(self, finish_reason: str | None, usage: UsageInfo | None) -> None:
        self.blocks = [b for b in self.blocks or self.reader.blocks if not self._over_cap(b)]
        self.usage = usage or self.usage
        self.incomplete = finish_reason == "length"
        self.status = "incomplete" if self.incomplete else "completed"
        reasoning = "".join(b.text for b in self.blocks if b.kind == "reasoning")
        if reasoning and self.count_tokens is not None:
            self.reasoning_tokens = self.count_tokens(reasoning)
        self.completed_at = int(time.time())

    def fail(self, exc: APIError) -> None:
        self.blocks = self.blocks or self.reader.blocks
        self.status = "failed"
        self.error = {"code": "server_error" if exc.status >= 500 else "invalid_request",
                      "message": exc.message}

    def cancel(self) -> None:
        self.blocks = self.blocks or self.reader.blocks
        self.reader.open = None
        self.status = "cancelled"

    def from_answer(self, answer: ChatCompletionResponse) -> dict[str, Any]:
        """A complete (non-streamed) chat answer -> the finished response object."""
        choice = answer.choices[0]
        self.blocks = blocks_of_message(choice.message, choice.logprobs)
        self.finish(choice.finish_reason, answer.usage)
        return self.snapshot()

    # ---- events ----------------------------------------------------------------------------------
    def _ev(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    async def events(self, open_chunks: Callable[[], Awaitable[AsyncIterator[ChatCompletionChunk]]]
                     ) -> AsyncIterator[dict[str, Any]]:
        """The SSE events of this response from the chat chunks `open_chunks` starts; stores it
        at the end (a cancel that landed in the store meanwhile wins: the status is cancelled)."""
        self.status = "in_progress"
        yield self._ev("response.created", response=self.snapshot())
        yield self._ev("response.in_progress", response=self.snapshot())
        chunks: AsyncIterator[ChatCompletionChunk] | None = None
        try:
            chunks = await open_chunks()
            async for chunk in chunks:
                for kind, block, text in self.reader.feed(chunk):
                    for event in self._block_events(kind, block, text):
                        yield event
            for kind, block, text in self.reader.close():
                for event in self._block_events(kind, block, text):
                    yield event
            self.finish(self.reader.finish_reason, self.reader.usage)
        except APIError as exc:
            self.fail(exc)
            await self.save()
            yield self._ev("error", code=self.error["code"] if self.error else None,
                           message=exc.message, param=exc.param)
            yield self._ev("response.failed", response=self.snapshot())
            return
        finally:
            if chunks is not None:
                await chunks.aclose()  # type: ignore[attr-defined]
        if await self.save():
            # as vLLM: response.completed ends every finished stream (its status may say
            # incomplete); OpenAI sends response.incomplete, which the openai SDK's
            # responses.stream() helper does not accept as an end
            end = "response.failed" if self.status == "failed" else "response.completed"
            yield self._ev(end, response=self.snapshot())
        else:
            self.cancel()

    def _block_events(self, kind: str, block: Block, text: str) -> list[dict[str, Any]]:
        if self._over_cap(block):
            return []
        where = {"item_id": item_id(block), "output_index": block.index}
        has_part = block.kind != "tool_call"
        if kind == "start":
            events = [self._ev("response.output_item.added", output_index=block.index,
                               item=output_item(block, "in_progress"))]
            if has_part:
                events.append(self._ev("response.content_part.added", **where, content_index=0,
                                       part=content_part(block, "")))
            return events
        if kind == "delta":
            extra: dict[str, Any] = {"content_index": 0} if has_part else {}
            if block.kind == "text":
                extra["logprobs"] = self.reader.delta_logprobs
            return [self._ev(_DELTA_EVENTS[block.kind], **where, **extra, delta=text)]
        if block.kind == "tool_call":
            events = [self._ev("response.function_call_arguments.done", **where,
                               name=block.name, arguments=block.text)]
        else:
            done = "response.output_text.done" if block.kind == "text" else \
                "response.reasoning_text.done"
            extra = {"logprobs": block.logprobs} if block.kind == "text" else {}
            events = [self._ev(done, **where, content_index=0, text=block.text, **extra),
                      self._ev("response.content_part.done", **where, content_index=0,
                               part=content_part(block))]
        events.append(self._ev("response.output_item.done", output_index=block.index,
                               item=output_item(block)))
        return events
