"""OpenAI-compatible request and response structs (msgspec), with vLLM's extra fields (API workers).

Unknown request fields are ignored (msgspec's default); a known field of the wrong type fails
decoding with a message naming it.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Struct

from fornax.api.protocol.bounded import (
    CacheSalt,
    ChatTemplate,
    DetokenizeTokens,
    Documents,
    Int64,
    Messages,
    ReasoningEffort,
    RequestId,
    ThinkingBudget,
    Tools,
    TruncationSide,
    User,
    VllmXargs,
)

# ---- errors ----------------------------------------------------------------------------------


class ErrorInfo(Struct):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(Struct):
    error: ErrorInfo


# ---- models ----------------------------------------------------------------------------------


class ModelPermission(Struct):
    id: str
    created: int
    object: str = "model_permission"
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(Struct):
    id: str
    created: int
    root: str
    max_model_len: int
    object: str = "model"
    owned_by: str = "fornax"
    parent: str | None = None
    permission: list[ModelPermission] = []
    status: str = "loaded"  # fornax's: loaded, or failed while its engine restarts


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


# ---- shared request pieces -------------------------------------------------------------------


class StreamOptions(Struct):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class _SamplingFields(Struct, kw_only=True):
    """Fields chat and completions share (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: User | None = None
    response_format: dict[str, Any] | None = None
    # vLLM extras
    best_of: int | None = None
    use_beam_search: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    priority: Int64 = 0
    cache_salt: CacheSalt | None = None
    request_id: RequestId | None = None
    return_tokens_as_token_ids: bool | None = None
    echo: bool = False
    detokenize: bool = True
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted; xgrammar always (see the header)
    guided_whitespace_pattern: str | None = None  # refused: xgrammar has no such option
    repetition_detection: dict[str, Any] | None = None
    truncation_side: TruncationSide | None = None  # with truncate_prompt_tokens; None: left
    return_token_ids: bool | None = None
    vllm_xargs: VllmXargs | None = None  # accepted as {}; any key is a 400 (no extensions)
    thinking_token_budget: ThinkingBudget | None = None  # needs --reasoning-parser


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: Messages
    logprobs: bool | None = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    tools: Tools | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: Documents | None = None
    chat_template: ChatTemplate | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: ReasoningEffort | None = None
    include_reasoning: bool = True
    return_prompt_text: bool | None = None


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: str | list[Any] | None = None
    logprobs: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True


# ---- usage and logprobs ----------------------------------------------------------------------


class PromptTokenUsageInfo(Struct):
    cached_tokens: int = 0


class UsageInfo(Struct):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: PromptTokenUsageInfo | None = None


class ChatTopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[ChatTopLogprob] = []


class ChatLogprobs(Struct):
    content: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(Struct):
    text_offset: list[int] = []
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    top_logprobs: list[dict[str, float] | None] = []


# ---- chat responses --------------------------------------------------------------------------


class ChatMessage(Struct):
    role: str
    content: str | None = None
    tool_calls: list[dict[str, Any]] = []
    reasoning: str | None = None  # the thinking, with --reasoning-parser


class ChatChoice(Struct):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids


class PromptLogprob(Struct):
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None]


class ChatCompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    object: str = "chat.completion"
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids
    prompt_text: str | None = None  # return_prompt_text


class DeltaFunctionCall(Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(Struct, omit_defaults=True):
    """A streamed tool call: the first delta of a call has its id, type and name."""

    index: int
    id: str | None = None
    type: str | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(Struct):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids: this chunk's tokens


class ChatCompletionChunk(Struct, omit_defaults=True, tag_field="object",
                          tag="chat.completion.chunk"):
    """One SSE chunk; `object` is the tag, so omit_defaults never drops it (OpenAI and vLLM
    send it)."""

    id: str
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids: the first chunk only
    prompt_text: str | None = None  # return_prompt_text: the first chunk only


# ---- completion responses --------------------------------------------------------------------


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids (vLLM: on the choice)
    token_ids: list[int] | None = None  # return_token_ids


class CompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    object: str = "text_completion"
    system_fingerprint: str | None = None


class CompletionChunk(Struct, omit_defaults=True, tag_field="object", tag="text_completion"):
    """One SSE chunk of /v1/completions; `object` is the tag, always sent (as vLLM does)."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---- tokenize / detokenize -------------------------------------------------------------------


class TokenizeRequest(Struct, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: Messages | None = None
    tools: Tools | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool | None = False
    chat_template: ChatTemplate | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(Struct):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(Struct, kw_only=True):
    tokens: DetokenizeTokens
    model: str | None = None


class DetokenizeResponse(Struct):
    prompt: str


def encode(obj: Any) -> bytes:
    """JSON bytes of a response struct."""
    return msgspec.json.encode(obj)
