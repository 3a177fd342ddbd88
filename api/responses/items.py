"""Responses API <-> chat: input items to chat messages, request fields to a chat body, chat
output blocks to output items, and the response object (API workers)."""

from __future__ import annotations

import uuid
from typing import Any, get_args

from fornax.api.protocol.bounded import ReasoningEffort
from fornax.api.protocol.openai import UsageInfo
from fornax.api.protocol.responses import INCLUDABLE, RESPONSES_ONLY_FIELDS, ResponsesRequest
from fornax.api.routes.chat_blocks import Block
from fornax.api.server.errors import APIError
from fornax.api.tools.messages import function_tools

_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")
_EFFORTS = get_args(ReasoningEffort)  # chat's reasoning_effort values
_ID_PREFIXES = {"text": "msg", "reasoning": "rs", "tool_call": "fc"}
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---- request -> chat -------------------------------------------------------------------------


def _content(value: Any, param: str) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise APIError(400, f"{param} must be a string or a list of content parts", param)
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise APIError(400, f"{param}[{j}]: content parts of type {kind!r} are not supported "
                           "by this text-only model", f"{param}[{j}]")
        texts.append(str(part.get("text", part.get("refusal", ""))))
    if len(texts) == 1:
        return texts[0]
    return [{"type": "text", "text": t} for t in texts]


def _required(item: dict[str, Any], key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise APIError(400, f"{param}.{key} is required (a string)", f"{param}.{key}")
    return value


def input_messages(items: str | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Responses input (text or items) -> chat messages. Function calls join the assistant
    message before them; reasoning items are dropped (templates do not replay old thinking)."""
    if items is None:
        return []
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{param} must be an object", param)
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = _ROLES.get(item.get("role"))  # type: ignore[arg-type]
            if role is None:
                raise APIError(400, f"{param}.role must be user, assistant, system or developer",
                               f"{param}.role")
            out.append({"role": role, "content": _content(item.get("content"),
                                                          f"{param}.content")})
        elif kind == "function_call":
            call = {"id": _required(item, "call_id", param), "type": "function", "function": {
                "name": _required(item, "name", param),
                "arguments": str(item.get("arguments") or "{}")}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": _required(item, "call_id", param),
                        "content": output if isinstance(output, str) else
                        _content(output, f"{param}.output")})
        elif kind == "reasoning":
            continue
        else:
            raise APIError(400, f"{param}: input items of type {kind!r} are not supported",
                           f"{param}.type")
    for message in out:  # templates expect string content next to tool calls
        if message["role"] == "assistant" and isinstance(message["content"], list):
            message["content"] = "".join(p["text"] for p in message["content"])
    return out


_INPUT_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco",
                      "reasoning": "rs"}


def input_items(value: str | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The request's input as items with ids (GET /v1/responses/{id}/input_items)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    items = []
    for item in value:
        item = {"type": "message", **item} if "type" not in item else dict(item)
        if item["type"] == "message" and isinstance(item.get("content"), str):
            item["content"] = [{"type": "input_text", "text": item["content"]}]
        item.setdefault("id", new_id(_INPUT_ID_PREFIXES.get(item["type"], "item")))
        items.append(item)
    return items


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    return function_tools(
        tools, lambda t: t.get("type") == "function" and isinstance(t.get("name"), str),
        "only function tools are supported, got",
        lambda t: {key: t[key] for key in ("name", "description", "parameters", "strict")
                   if t.get(key) is not None})


def _tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise APIError(400, "tool_choice must be none, auto, required or {type: function, name}",
                   "tool_choice")


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if fmt is not None and not isinstance(fmt, dict):
        raise APIError(400, "text.format must be an object", "text.format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        spec.setdefault("name", "output")
        return {"type": "json_schema", "json_schema": spec}
    raise APIError(400, "text.format must be {type: text}, {type: json_object} or {type: "
                   "json_schema, name, schema}", "text.format")


def chat_body(raw: dict[str, Any], body: ResponsesRequest, messages: list[dict[str, Any]],
              stream: bool) -> dict[str, Any]:
    """The chat request that answers this response; vLLM extras pass through."""
    out = {k: v for k, v in raw.items() if k not in RESPONSES_ONLY_FIELDS}
    if body.instructions:
        messages = [{"role": "system", "content": body.instructions}, *messages]
    effort = (body.reasoning or {}).get("effort")
    if effort is not None and effort not in _EFFORTS:
        raise APIError(400, f"reasoning.effort must be one of {', '.join(_EFFORTS)}",
                       "reasoning.effort")
    for value in body.include or ():
        if value not in INCLUDABLE:
            raise APIError(400, f"include {value[:64]!r} is not supported by this server; it "
                           f"can include {', '.join(sorted(INCLUDABLE))}", "include")
    logprobs = "message.output_text.logprobs" in (body.include or ())
    tool_choice = _tool_choice(body.tool_choice)
    parallel = out.get("parallel_tool_calls")
    if body.max_tool_calls == 0 and body.tools:
        tool_choice = "none"  # no call may be made
    elif body.max_tool_calls == 1:
        parallel = False  # one call at most (more are cut in ResponseRun)
    out.update({
        "messages": messages, "stream": stream, "max_tokens": body.max_output_tokens,
        "tools": _tools(body.tools), "tool_choice": tool_choice,
        "parallel_tool_calls": parallel,
        "response_format": _response_format(body.text),
        "reasoning_effort": effort,
        "stream_options": {"include_usage": True} if stream else None,
        "logprobs": True if logprobs else None,
        "top_logprobs": body.top_logprobs if logprobs else None,
    })
    return {k: v for k, v in out.items() if v is not None}


# ---- chat output -> items --------------------------------------------------------------------


def item_id(block: Block) -> str:
    if not block.item_id:
        block.item_id = new_id(_ID_PREFIXES[block.kind])
    return block.item_id


def output_item(block: Block, status: str = "completed") -> dict[str, Any]:
    """The output item of a block (as far as it goes when `status` is in_progress)."""
    if block.kind == "tool_call":
        return {"type": "function_call", "id": item_id(block), "call_id": block.call_id,
                "name": block.name, "arguments": block.text, "status": status}
    if block.kind == "reasoning":
        return {"type": "reasoning", "id": item_id(block), "summary": [], "status": status,
                "content": [{"type": "reasoning_text", "text": block.text}]}
    return {"type": "message", "id": item_id(block), "status": status, "role": "assistant",
            "content": [content_part(block)] if status == "completed" or block.text else []}


def content_part(block: Block, text: str | None = None) -> dict[str, Any]:
    value = block.text if text is None else text
    if block.kind == "reasoning":
        return {"type": "reasoning_text", "text": value}
    return {"type": "output_text", "text": value, "annotations": [],
            "logprobs": block.logprobs if text is None else []}


def assistant_message(blocks: list[Block]) -> dict[str, Any]:
    """The chat message of an answer (stored for previous_response_id)."""
    message: dict[str, Any] = {
        "role": "assistant", "content": "".join(b.text for b in blocks if b.kind == "text")}
    calls = [{"id": b.call_id, "type": "function",
              "function": {"name": b.name, "arguments": b.text}}
             for b in blocks if b.kind == "tool_call"]
    if calls:
        message["tool_calls"] = calls
    return message


def usage_of(usage: UsageInfo | None, reasoning_tokens: int = 0) -> dict[str, Any] | None:
    if usage is None:
        return None
    details = usage.prompt_tokens_details
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": details.cached_tokens if details else 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": usage.total_tokens}


def response_object(rid: str, created_at: int, body: ResponsesRequest, model: str, *,
                    status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None,
                    error: dict[str, Any] | None = None, incomplete: bool = False,
                    completed_at: int | None = None) -> dict[str, Any]:
    fmt = (body.text or {}).get("format") or {"type": "text"}
    return {
        "id": rid, "object": "response", "created_at": created_at, "status": status,
        "background": body.background, "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "model": model, "output": output,
        "parallel_tool_calls": True if body.parallel_tool_calls is None
        else body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": (body.reasoning or {}).get("effort"), "summary": None},
        "store": body.store, "temperature": body.temperature, "text": {"format": fmt},
        "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
        "top_p": body.top_p, "truncation": body.truncation or "disabled", "usage": usage,
        "user": body.user, "metadata": body.metadata or {}, "completed_at": completed_at,
        "top_logprobs": body.top_logprobs, "max_tool_calls": body.max_tool_calls,
    }
