"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API over the chat path
(API workers).

A Messages request is translated into a chat request (system -> system message, tool_use ->
assistant tool_calls, tool_result -> tool messages, stop_sequences -> stop), run through the chat
path's typed entry `chat.run_chat`, and its answer or chunks are translated back into Anthropic's
message object or event stream. Errors use Anthropic's shape.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from fornax.api.protocol.anthropic import (
    CountTokensRequest,
    CountTokensResponse,
    ErrorDetail,
    ErrorResponse,
    Message,
    MessagesRequest,
    Usage,
)
from fornax.api.protocol.openai import ChatCompletionChunk, UsageInfo
from fornax.api.routes import chat, tokenization
from fornax.api.routes.chat_blocks import Block, ChatDeltaReader, blocks_of_message
from fornax.api.routes.subrequest import call_json, subrequest
from fornax.api.server.errors import APIError
from fornax.api.server.http import Request, Response, StreamingResponse, json_response
from fornax.api.tools.messages import function_tools
from fornax.runtime.limits import MAX_THINKING_TOKEN_BUDGET

logger = logging.getLogger(__name__)

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def error_body(exc: APIError) -> ErrorResponse:
    kind = _ERROR_TYPES.get(exc.status, "invalid_request_error" if exc.status < 500
                            else "api_error")
    return ErrorResponse(ErrorDetail(kind, exc.message))


def error_response(exc: APIError) -> Response:
    """An error in Anthropic's shape: {"type": "error", "error": {"type", "message"}}."""
    return Response(msgspec.json.encode(error_body(exc)), exc.status, headers=exc.headers)


def _event(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(obj) + b"\n\n"


# ---- request -> chat body ------------------------------------------------------------------


def _text_of(value: Any, param: str) -> str:
    """A string, or the text of a list of text blocks (system prompts, tool results)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for j, block in enumerate(value):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind != "text":
                raise APIError(400, f"{param}[{j}]: only text blocks are supported here, got "
                               f"{kind!r}", param)
            parts.append(str(block.get("text", "")))
        return "\n".join(parts)
    raise APIError(400, f"{param} must be a string or a list of text blocks", param)


def _convert_message(i: int, msg: Any) -> list[dict[str, Any]]:
    if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant"):
        raise APIError(400, f"messages[{i}].role must be 'user' or 'assistant'",
                       f"messages[{i}].role")
    role, content = msg["role"], msg.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise APIError(400, f"messages[{i}].content must be a string or a list of content blocks",
                       f"messages[{i}].content")
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    thinking: list[str] = []
    for j, block in enumerate(content):
        param = f"messages[{i}].content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use" and role == "assistant":
            calls.append({"id": str(block.get("id", "")), "type": "function", "function": {
                "name": str(block.get("name", "")),
                "arguments": json.dumps(block.get("input") or {})}})
        elif kind == "tool_result" and role == "user":
            out.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")),
                        "content": _text_of(block.get("content"), param + ".content")})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            thinking.append(str(block.get("thinking", "")))
        elif kind in ("image", "document"):
            raise APIError(400, f"{param}: {kind} content is not supported by this text-only "
                           "model", param)
        else:
            raise APIError(400, f"{param}: content blocks of type {kind!r} are not supported in "
                           f"{role} messages", param)
    if role == "assistant":
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        if calls:
            message["tool_calls"] = calls
        if thinking:
            message["reasoning_content"] = "".join(thinking)
        out.append(message)
    elif texts:
        out.append({"role": "user", "content": texts[0] if len(texts) == 1 else
                    [{"type": "text", "text": t} for t in texts]})
    return out


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    fn = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
    if tool.get("description"):
        fn["description"] = tool["description"]
    return fn


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    return function_tools(
        tools, lambda t: t.get("type") in (None, "custom") and "name" in t,
        "only client tools (name, description, input_schema) are supported, got type", _function)


def _tool_choice(choice: dict[str, Any] | None) -> tuple[Any, bool | None]:
    """(chat tool_choice, parallel_tool_calls) of an Anthropic tool_choice."""
    if choice is None:
        return None, None
    kind = choice.get("type")
    parallel = False if choice.get("disable_parallel_tool_use") else None
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", None
    if kind == "tool" and choice.get("name"):
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise APIError(400, "tool_choice.type must be auto, any, tool (with name) or none",
                   "tool_choice")


def chat_messages(system: Any, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system_text = _text_of(system, "system")
    if system_text:
        out.append({"role": "system", "content": system_text})
    for i, msg in enumerate(messages):
        out.extend(_convert_message(i, msg))
    return out


def _thinking_kwargs(thinking: dict[str, Any] | None,
                     request_kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    """thinking {type: enabled|adaptive|disabled} -> the templates' enable_thinking switch,
    under the request's own chat_template_kwargs (which win; they are never dropped)."""
    if not thinking:
        return request_kwargs
    kind = thinking.get("type")
    if kind not in ("enabled", "adaptive", "disabled"):
        raise APIError(400, "thinking.type must be enabled, adaptive or disabled",
                       "thinking.type")
    return {"enable_thinking": kind != "disabled", **(request_kwargs or {})}


def _thinking_budget(thinking: dict[str, Any] | None) -> int | None:
    """thinking.budget_tokens (type enabled) -> chat's thinking_token_budget."""
    budget = (thinking or {}).get("budget_tokens")
    if budget is None or (thinking or {}).get("type") == "disabled":
        return None
    if not isinstance(budget, int) or isinstance(budget, bool) or \
            not 0 <= budget <= MAX_THINKING_TOKEN_BUDGET:
        raise APIError(400, f"thinking.budget_tokens must be an integer in [0, "
                       f"{MAX_THINKING_TOKEN_BUDGET}]", "thinking.budget_tokens")
    return budget


def _output_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """output_config {effort, format} -> chat's reasoning_effort and response_format."""
    out: dict[str, Any] = {}
    if not config:
        return out
    if isinstance(config.get("effort"), str):
        out["reasoning_effort"] = config["effort"]
    fmt = config.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or \
                not isinstance(fmt.get("schema"), dict):
            raise APIError(400, "output_config.format must be {type: json_schema, schema}",
                           "output_config.format")
        out["response_format"] = {"type": "json_schema",
                                  "json_schema": {"name": "output", "schema": fmt["schema"]}}
    return out


def to_chat_body(body: MessagesRequest, raw: dict[str, Any],
                 reasoning: bool = True) -> dict[str, Any]:
    """The chat request answering `body`; fields Anthropic does not define (vLLM's sampling
    extras such as seed, min_p, repetition_penalty) pass through. `reasoning`: the server has a
    reasoning parser (without one, thinking.budget_tokens has no thinking to bound)."""
    tool_choice, parallel = _tool_choice(body.tool_choice)
    extras = {k: v for k, v in raw.items() if k not in MessagesRequest.__struct_fields__}
    chat_body: dict[str, Any] = {
        **extras,
        "model": body.model, "messages": chat_messages(body.system, body.messages),
        "max_tokens": body.max_tokens, "stop": body.stop_sequences,
        "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
        "tools": _tools(body.tools), "tool_choice": tool_choice,
        "parallel_tool_calls": parallel, "stream": body.stream,
        "chat_template_kwargs": _thinking_kwargs(body.thinking, body.chat_template_kwargs),
        "thinking_token_budget": _thinking_budget(body.thinking) if reasoning else None,
        **_output_config(body.output_config),
    }
    if body.metadata and isinstance(body.metadata.get("user_id"), str):
        chat_body["user"] = body.metadata["user_id"]
    if body.stream:
        chat_body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return {k: v for k, v in chat_body.items() if v is not None}


# ---- chat answer -> Anthropic ---------------------------------------------------------------


def _stop(finish_reason: str | None, stop_reason: Any, stops: list[str] | None,
          called: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a chat finish (`called`: the answer has tool calls)."""
    if finish_reason == "tool_calls" or called:
        return "tool_use", None
    if finish_reason == "length":
        return "max_tokens", None
    if isinstance(stop_reason, str) and stops and stop_reason in stops:
        return "stop_sequence", stop_reason
    return "end_turn", None


def _usage(usage: UsageInfo | None) -> Usage:
    if usage is None:
        return Usage()
    details = usage.prompt_tokens_details
    cached = details.cached_tokens if details is not None else 0
    return Usage(input_tokens=usage.prompt_tokens - cached,
                 output_tokens=usage.completion_tokens, cache_read_input_tokens=cached)


def _block_json(block: Block) -> dict[str, Any]:
    if block.kind == "tool_call":
        return {"type": "tool_use", "id": block.call_id, "name": block.name,
                "input": block.arguments()}
    if block.kind == "reasoning":
        return {"type": "thinking", "thinking": block.text, "signature": ""}
    return {"type": "text", "text": block.text}


def _start_json(block: Block) -> dict[str, Any]:
    if block.kind == "tool_call":
        return {"type": "tool_use", "id": block.call_id, "name": block.name, "input": {}}
    if block.kind == "reasoning":
        return {"type": "thinking", "thinking": "", "signature": ""}
    return {"type": "text", "text": ""}


def _delta_json(block: Block, text: str) -> dict[str, Any]:
    if block.kind == "tool_call":
        return {"type": "input_json_delta", "partial_json": text}
    if block.kind == "reasoning":
        return {"type": "thinking_delta", "thinking": text}
    return {"type": "text_delta", "text": text}


async def messages(req: Request) -> Response:
    body = await req.json(MessagesRequest)
    model = req.state.resolve_model(body.model)
    msg_id = f"msg_{uuid.uuid4().hex}"
    raw = await req.json_value()
    answer, _ = await chat.run_chat(req, chat.chat_request(to_chat_body(
        body, raw, req.state.chat_features.reasoning_parser is not None)))
    if body.stream:
        return StreamingResponse(_stream(chat.as_stream(answer), model, msg_id,
                                         body.stop_sequences), headers={"x-request-id": msg_id})
    answer = await chat.as_response(answer)
    choice = answer.choices[0]
    blocks = blocks_of_message(choice.message)
    reason, sequence = _stop(choice.finish_reason, choice.stop_reason,
                             body.stop_sequences, any(b.kind == "tool_call" for b in blocks))
    content = [_block_json(b) for b in blocks]
    return json_response(Message(msg_id, model, content, reason, sequence,
                                 _usage(answer.usage)), headers={"x-request-id": msg_id})


async def _stream(chunks: AsyncIterator[ChatCompletionChunk], model: str, msg_id: str,
                  stops: list[str] | None) -> AsyncIterator[bytes]:
    reader = ChatDeltaReader()
    started = False
    try:
        async for chunk in chunks:
            out = reader.feed(chunk)
            if not started:
                started = True
                start = Message(msg_id, model, [], None, None, _usage(reader.usage))
                yield _event("message_start", {"type": "message_start", "message": start})
                yield _event("ping", {"type": "ping"})
            for kind, block, text in out:
                yield _block_event(kind, block, text)
        for kind, block, text in reader.close():
            yield _block_event(kind, block, text)
        reason, sequence = _stop(reader.finish_reason, reader.stop_reason, stops,
                                 any(b.kind == "tool_call" for b in reader.blocks))
        usage = _usage(reader.usage)
        yield _event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
                      "cache_read_input_tokens": usage.cache_read_input_tokens}})
        yield _event("message_stop", {"type": "message_stop"})
    except APIError as exc:
        yield _event("error", error_body(exc))
    except Exception:  # a bug: still end the stream the way clients expect
        logger.exception("messages stream %s failed", msg_id)
        yield _event("error", error_body(APIError(500, "internal server error")))
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


def _block_event(kind: str, block: Block, text: str) -> bytes:
    if kind == "start":
        return _event("content_block_start", {"type": "content_block_start",
                                              "index": block.index,
                                              "content_block": _start_json(block)})
    if kind == "delta":
        return _event("content_block_delta", {"type": "content_block_delta",
                                              "index": block.index,
                                              "delta": _delta_json(block, text)})
    return _event("content_block_stop", {"type": "content_block_stop", "index": block.index})


async def count_tokens(req: Request) -> Response:
    """The prompt's token count as the chat template renders it (with tools)."""
    body = await req.json(CountTokensRequest)
    req.state.resolve_model(body.model)
    tok_body: dict[str, Any] = {"model": body.model,
                                "messages": chat_messages(body.system, body.messages),
                                "tools": _tools(body.tools), "add_generation_prompt": True,
                                "chat_template_kwargs": _thinking_kwargs(
                                    body.thinking, body.chat_template_kwargs)}
    inner = subrequest(req, "/tokenize", {k: v for k, v in tok_body.items() if v is not None})
    counted = await call_json(tokenization.tokenize, inner)
    return json_response(CountTokensResponse(counted["count"]))
