"""Chat history as templates expect it: assistant tool calls with their arguments as objects,
and reasoning under both names; other APIs' tool lists as chat tools (API workers)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fornax.api.server.errors import APIError


def prepare_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A copy where needed (the request is not changed):

    - assistant `tool_calls` whose `function.arguments` is a JSON string get it parsed into an
      object (as vLLM does: templates write `arguments | tojson`, or test `is string`);
    - `reasoning` (what fornax answers) and `reasoning_content` (older vLLM, and what Qwen3 and
      DeepSeek templates read) are both set when either is given.
    """
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") != "assistant":
            out.append(msg)
            continue
        msg = dict(msg)
        calls = msg.get("tool_calls")
        if calls is not None:
            msg["tool_calls"] = _parsed_calls(calls, i)
        for have, missing in (("reasoning", "reasoning_content"),
                              ("reasoning_content", "reasoning")):
            if msg.get(have) is not None and msg.get(missing) is None:
                msg[missing] = msg[have]
        out.append(msg)
    return out


def _parsed_calls(calls: Any, i: int) -> list[Any]:
    param = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise APIError(400, f"{param} must be a list", param)
    parsed = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(400, f"{param}[{j}] needs a function with a name", f"{param}[{j}]")
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                value = json.loads(args) if args.strip() else {}
            except (json.JSONDecodeError, RecursionError):  # bad or absurdly nested JSON
                value = args  # kept as written: the template decides
            call = {**call, "function": {**fn, "arguments": value}}
        parsed.append(call)
    return parsed


def function_tools(tools: list[dict[str, Any]] | None, accepts: Callable[[dict[str, Any]], bool],
                   refusal: str, function: Callable[[dict[str, Any]], dict[str, Any]]
                   ) -> list[dict[str, Any]] | None:
    """Another API's tool list (Anthropic, Responses) as chat tools: each accepted tool's
    `function`; any other is a 400 naming tools[k] (`refusal`, then the tool's type)."""
    if not tools:
        return None
    out = []
    for k, tool in enumerate(tools):
        if not accepts(tool):
            raise APIError(400, f"tools[{k}]: {refusal} {tool.get('type')!r}", f"tools[{k}]")
        out.append({"type": "function", "function": function(tool)})
    return out
