"""OpenAI Responses API request struct (msgspec) (API workers).

Input and output items stay dicts: their shape depends on their `type`. Unknown fields are
ignored here; vLLM's sampling extras (top_k, min_p, seed, ...) are forwarded to the chat path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from fornax.api.protocol.bounded import (
    CacheSalt,
    Int64,
    Messages,
    RequestId,
    Tools,
    User,
    VllmXargs,
)

ResponseId = Annotated[str, Meta(max_length=256)]  # ours are resp_ + 32 hex digits

# include[] values this server produces; vLLM's others (reasoning.encrypted_content, ...) are a
# 400 naming include
INCLUDABLE = frozenset({"message.output_text.logprobs"})

# Fields of a Responses request that are not chat fields (everything else is forwarded to chat).
RESPONSES_ONLY_FIELDS = frozenset({
    "input", "instructions", "tools", "tool_choice", "text", "reasoning", "max_output_tokens",
    "previous_response_id", "store", "background", "stream", "metadata", "include",
    "truncation", "top_logprobs", "service_tier", "prompt", "prompt_cache_key",
    "prompt_cache_retention", "safety_identifier", "conversation", "max_tool_calls",
    "stream_options", "messages", "n", "response_format", "max_tokens",
    "max_completion_tokens",
})


class ResponsesRequest(Struct, kw_only=True):
    model: str | None = None
    input: str | Messages | None = None
    instructions: str | None = None
    tools: Tools | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    previous_response_id: ResponseId | None = None
    store: bool = True
    background: bool = False
    stream: bool = False
    metadata: dict[str, Any] | None = None
    user: User | None = None
    truncation: Literal["auto", "disabled"] | None = None  # auto: drop the oldest tokens
    include: Annotated[list[str], Meta(max_length=16)] | None = None  # see INCLUDABLE
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None  # with include logprobs
    max_tool_calls: Annotated[int, Meta(ge=0, le=1 << 20)] | None = None
    # vLLM's extras, handed to the chat path as they are (typed here so a wrong type is a 400)
    top_k: int | None = None
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: Int64 = 0
    cache_salt: CacheSalt | None = None
    structured_outputs: dict[str, Any] | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    vllm_xargs: VllmXargs | None = None
    # vLLM's extra (its response id is resp_<request_id>); here only the x-request-id header:
    # response ids are always made by the server
    request_id: RequestId | None = None
