"""The `llama3_json` tool-call format (Llama 3.1/3.2/3.3): the whole output is one or more JSON
objects `{"name": ..., "parameters": {...}}` separated by `;`, after an optional <|python_tag|>
(API workers)."""

from __future__ import annotations

from fornax.api.tools.base import ToolParse, ToolParseError, ToolParser
from fornax.api.tools.json_scan import call_from_object, scan_object, skip_ws
from fornax.api.tools.registry import register_tool_parser


@register_tool_parser("llama3_json")
class Llama3JsonToolParser(ToolParser):
    tag = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> ToolParse:
        j = skip_ws(text, 0)
        rest = text[j:]
        if rest.startswith(self.tag):
            j = skip_ws(text, j + len(self.tag))
        elif not rest or (self.tag.startswith(rest) and not final):
            return ToolParse(text if final else "")
        elif rest[0] != "{":
            return ToolParse(text)  # plain text: not a call
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
