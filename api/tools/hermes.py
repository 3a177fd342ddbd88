"""The `hermes` tool-call format (Hermes, Qwen2.5/Qwen3): `<tool_call>{"name": ..., "arguments":
{...}}</tool_call>` blocks after optional text (API workers)."""

from __future__ import annotations

from fornax.api.tools.base import ToolParse, ToolParseError, ToolParser, hold_partial
from fornax.api.tools.json_scan import call_from_object, scan_object, skip_ws
from fornax.api.tools.registry import register_tool_parser


@register_tool_parser("hermes")
class HermesToolParser(ToolParser):
    start = "<tool_call>"
    end = "</tool_call>"

    def parse(self, text: str, final: bool) -> ToolParse:
        first = text.find(self.start)
        if first < 0:
            return ToolParse(text if final else hold_partial(text, (self.start,)))
        result = ToolParse(text[:first])
        pos = first
        while pos >= 0:
            j = skip_ws(text, pos + len(self.start))
            if j >= len(text):
                break
            if text[j] != "{":
                raise ToolParseError("a <tool_call> block must hold a JSON object")
            scan = scan_object(text, j)
            call = call_from_object(text, scan)
            if call is None:
                break
            result.calls.append(call)
            if scan.end is None:
                break
            k = skip_ws(text, scan.end)
            if text.startswith(self.end, k):
                k += len(self.end)
            elif k < len(text) and not self.end.startswith(text[k:]):
                raise ToolParseError("a tool call must end with </tool_call>")
            pos = text.find(self.start, k)
        if final and (not result.calls or not all(c.complete for c in result.calls)):
            raise ToolParseError("an unfinished <tool_call> block")
        return result
