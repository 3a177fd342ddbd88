"""A chat answer as output blocks (text, reasoning, tool calls): from a whole message, or from
streamed chunks as block starts, deltas and stops; read by the Anthropic Messages and Responses
surfaces from the chat path's typed structs (API workers)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgspec

from fornax.api.protocol.openai import ChatCompletionChunk, ChatLogprobs, ChatMessage, UsageInfo


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
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # a text block's, if asked

    def arguments(self) -> dict[str, Any]:
        """A tool call's arguments as an object ({} when the model wrote no valid JSON object)."""
        try:
            value = json.loads(self.text) if self.text.strip() else {}
        except json.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}


def logprob_entries(logprobs: ChatLogprobs | None) -> list[dict[str, Any]]:
    """Chat logprobs as output_text logprobs ({token, logprob, bytes, top_logprobs})."""
    if logprobs is None or not logprobs.content:
        return []
    return msgspec.to_builtins(logprobs.content)


def blocks_of_message(message: ChatMessage, logprobs: ChatLogprobs | None = None
                      ) -> list[Block]:
    """A complete chat message -> its blocks: reasoning, text, then each tool call."""
    blocks: list[Block] = []
    if message.reasoning:
        blocks.append(Block("reasoning", len(blocks), message.reasoning))
    if message.content:
        blocks.append(Block("text", len(blocks), message.content,
                            logprobs=logprob_entries(logprobs)))
    for call in message.tool_calls:
        fn = call.get("function") or {}
        blocks.append(Block("tool_call", len(blocks), fn.get("arguments") or "",
                            call.get("id") or "", fn.get("name") or ""))
    return blocks


BlockEvent = tuple[str, Block, str]


class ChatDeltaReader:
    """Turns chat chunks (choice 0) into block starts, deltas and stops.

    `feed` returns ("start", block, ""), ("delta", block, text) and ("stop", block, "") events in
    order; one block is open at a time (a new kind or a new tool-call index closes the open one).
    """

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.open: Block | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.usage: UsageInfo | None = None
        self.delta_logprobs: list[dict[str, Any]] = []  # of the last text delta fed

    def feed(self, chunk: ChatCompletionChunk) -> list[BlockEvent]:
        if chunk.usage is not None:
            self.usage = chunk.usage
        events: list[BlockEvent] = []
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            delta = choice.delta
            if delta.reasoning:
                self._add(events, "reasoning", "reasoning", delta.reasoning)
            if delta.content:
                block = self._add(events, "text", "text", delta.content)
                entries = logprob_entries(choice.logprobs)
                block.logprobs.extend(entries)
                self.delta_logprobs = entries
            for call in delta.tool_calls or ():
                fn = call.function
                name = (fn.name if fn is not None else None) or ""
                block = self._add(events, "tool_call", ("tool_call", call.index),
                                  (fn.arguments if fn is not None else None) or "",
                                  call.id or "", name)
                block.call_id = block.call_id or call.id or ""
                block.name = block.name or name
            if choice.finish_reason is not None:
                self.finish_reason = choice.finish_reason
                self.stop_reason = choice.stop_reason
        return events

    def _add(self, events: list[BlockEvent], kind: str, key: Any, text: str,
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

    def close(self) -> list[BlockEvent]:
        """Stop the open block (at the end of the answer)."""
        if self.open is None:
            return []
        block, self.open = self.open, None
        return [("stop", block, "")]
