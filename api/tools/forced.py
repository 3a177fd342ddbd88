"""tool_choice "required" and named: the grammar that forces a call and the parsers that read
it back, whatever the model's own tool format (API workers).

As vLLM does, "required" constrains the output to a JSON list of {"name", "parameters"} objects,
each naming one of the tools with arguments valid for its schema; a named choice constrains the
output to that tool's arguments. Both therefore always parse.
"""

from __future__ import annotations

from typing import Any

from fornax.api.tools.base import ToolCallPart, ToolParse, ToolParseError, ToolParser
from fornax.api.tools.json_scan import scan_call_list, skip_ws

_NO_PARAMETERS = {"type": "object", "properties": {}}


def tool_parameters(tool: dict[str, Any]) -> dict[str, Any]:
    params = tool["function"].get("parameters")
    return params if isinstance(params, dict) and params else dict(_NO_PARAMETERS)


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """A JSON list of one or more calls, each to a known tool with valid arguments."""
    variants = [{"type": "object",
                 "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                "parameters": tool_parameters(t)},
                 "required": ["name", "parameters"]} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": variants[0] if len(variants) == 1 else {"anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


class RequiredToolParser(ToolParser):
    """Reads the JSON list that tool_choice "required" forces."""

    name = "required"

    def parse(self, text: str, final: bool) -> ToolParse:
        j = skip_ws(text, 0)
        if j >= len(text):
            if final:
                raise ToolParseError("no tool calls")
            return ToolParse("")
        if text[j] != "[":
            raise ToolParseError("expected a JSON list of tool calls")
        calls, end = scan_call_list(text, j, final, ("parameters", "arguments"))
        if final and (end is None or text[end:].strip() or not calls):
            raise ToolParseError("not a closed, non-empty list of tool calls")
        return ToolParse("", calls)


class NamedToolParser(ToolParser):
    """A named tool_choice: the whole output is the arguments of that tool."""

    name = "named"

    def __init__(self, tools: list[dict[str, Any]] | None, function: str) -> None:
        super().__init__(tools)
        self.function = function

    def parse(self, text: str, final: bool) -> ToolParse:
        return ToolParse("", [ToolCallPart(self.function, text, final)])
