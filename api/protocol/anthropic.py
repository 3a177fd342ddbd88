"""Anthropic Messages API request and response structs (msgspec) (API workers).

Unknown request fields are ignored; a known field of the wrong type fails decoding with a message
naming it. Content blocks stay dicts: their shape depends on their `type`.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Struct

from fornax.api.protocol.bounded import Messages, Tools


class MessagesRequest(Struct, kw_only=True):
    messages: Messages
    max_tokens: int  # required by the Anthropic API
    model: str | None = None
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tools: Tools | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None  # {type: enabled|adaptive|disabled, budget_tokens}
    output_config: dict[str, Any] | None = None  # {effort, format: {type: json_schema, schema}}
    service_tier: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extra


class CountTokensRequest(Struct, kw_only=True):
    messages: Messages
    model: str | None = None
    system: str | list[dict[str, Any]] | None = None
    tools: Tools | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extra


class Usage(Struct):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class Message(Struct):
    id: str
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: Usage = msgspec.field(default_factory=Usage)
    type: str = "message"
    role: str = "assistant"


class CountTokensResponse(Struct):
    input_tokens: int


class ErrorDetail(Struct):
    type: str
    message: str


class ErrorResponse(Struct):
    error: ErrorDetail
    type: str = "error"
