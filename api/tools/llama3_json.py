"""The `llama3_json` tool-call format (Llama 3.1/3.2/3.3): the whole output is one or more JSON
objects `{"name": ..., "parameters": {...}}` separated by `;`, after an optional <|python_tag|>
(API workers)."""

from __future__ import annotations

from fornax.api.tools.base import ToolParse, ToolParseError, ToolParser
from fornax.api.tools.json_scan import call_from_object, calls_start, scan_object, skip_ws
from fornax.api.tools.registry import register_tool_parser


@register_tool_parser("llama3_json")
class Llama3JsonToolParser(ToolParser):
    tag = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> ToolParse:
        j = calls_start(text, self.tag, "{", final)
        if isinstance(j, ToolParse):
            return j
        result = ToolParse("")
        while True:
            j = skip_ws(text, j)
            if j >= len(text):
                break
            if text[j] == ";":
                j += 1
                continue
            if text[j] != "{":
                raise ToolParseError("expected a JSON object after ';'")
            scan = scan_object(text, j)
            call = call_from_object(text, scan, ("parameters", "arguments"))
            if call is None:
                if final:
                    raise ToolParseError("a JSON object without a tool name")
                break
            result.calls.append(call)
            if scan.end is None:
                break
            j = scan.end
        if final and not result.calls:
            raise ToolParseError("no tool call")
        return result
