"""The `mistral` tool-call format: `[TOOL_CALLS]` then a JSON list of {"name", "arguments"}
objects (v3 tokenizers), or `name[ARGS]{...}` per call (v11+), after optional text (API workers).

[TOOL_CALLS] is a special token, so these requests keep special tokens in the text; the
end-of-sequence token the output may then end with is dropped from the content.
"""

from __future__ import annotations

from typing import Any

from fornax.api.tools.base import ToolCallPart, ToolParse, ToolParseError, ToolParser, hold_partial
from fornax.api.tools.json_scan import scan_call_list, scan_value, skip_ws
from fornax.api.tools.registry import register_tool_parser

_EOS = ("</s>",)


@register_tool_parser("mistral")
class MistralToolParser(ToolParser):
    id_style = "mistral"
    bot = "[TOOL_CALLS]"
    args_tag = "[ARGS]"
    call_id_tag = "[CALL_ID]"

    def adjust_params(self, changes: dict[str, Any]) -> None:
        changes["skip_special_tokens"] = False

    def parse(self, text: str, final: bool) -> ToolParse:
        for eos in _EOS:
            if text.endswith(eos):
                text = text[: -len(eos)]
        first = text.find(self.bot)
        if first < 0:
            return ToolParse(text if final else hold_partial(text, (self.bot, *_EOS)))
        result = ToolParse(text[:first])
        j = skip_ws(text, first + len(self.bot))
        if j < len(text) and text[j] == "[":
            calls, end = scan_call_list(text, j, final)
            result.calls = calls
            if final and text[end:].strip():
                raise ToolParseError("text after the list of tool calls")
            return result
        pos = first
        while pos >= 0:
            call, pos = self._named_call(text, pos + len(self.bot), final)
            if call is None:
                break
            result.calls.append(call)
        if final and not result.calls:
            raise ToolParseError("[TOOL_CALLS] without a call")
        return result

    def _named_call(self, text: str, i: int, final: bool) -> tuple[ToolCallPart | None, int]:
        """`name[ARGS]{...}` (or `name[CALL_ID]id[ARGS]{...}`) from i; next [TOOL_CALLS] or -1."""
        args_at = text.find(self.args_tag, i)
        if args_at < 0:
            if final:
                raise ToolParseError("a tool call without [ARGS]")
            return None, -1
        name = text[i:args_at]
        if self.call_id_tag in name:
            name = name[: name.index(self.call_id_tag)]
        name = name.strip()
        if not name or any(c in name for c in "[]{}\"\n"):
            raise ToolParseError(f"bad tool name {name!r}")
        j = skip_ws(text, args_at + len(self.args_tag))
        if j >= len(text):
            return ToolCallPart(name, "", False), -1
        if text[j] != "{":
            raise ToolParseError("[ARGS] must be followed by a JSON object")
        end = scan_value(text, j)
        if end is None:
            return ToolCallPart(name, text[j:], False), -1
        nxt = text.find(self.bot, end)
        if final and text[end:nxt if nxt >= 0 else len(text)].strip():
            raise ToolParseError("text after a tool call's arguments")
        return ToolCallPart(name, text[j:end], True), nxt
