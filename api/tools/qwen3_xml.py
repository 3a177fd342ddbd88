"""The `qwen3_xml` tool-call format (Qwen3-Coder): `<tool_call><function=NAME><parameter=P>value
</parameter>...</function></tool_call>` after optional text (API workers).

Parameter values are text; each is converted by the type its tool's JSON schema gives it (a
string stays a string, numbers, booleans, objects and arrays are parsed). The JSON arguments grow
one parameter at a time while streaming: `{"a": 1`, then `, "b": "x"`, then `}`.
"""

from __future__ import annotations

import ast
import json
from typing import Any

from fornax.api.tools.base import ToolCallPart, ToolParse, ToolParseError, ToolParser, hold_partial
from fornax.api.tools.json_scan import skip_ws
from fornax.api.tools.registry import register_tool_parser

_CALL_START, _CALL_END = "<tool_call>", "</tool_call>"
_FN_START, _FN_END = "<function=", "</function>"
_PARAM_START, _PARAM_END = "<parameter=", "</parameter>"


def _types(schema: Any) -> set[str]:
    if not isinstance(schema, dict):
        return set()
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return {k for k in kind if isinstance(k, str)}
    found: set[str] = set()
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            found |= _types(sub)
    if "enum" in schema and not found:
        found = {"string"} if all(isinstance(v, str) for v in schema["enum"]) else {"any"}
    return found


def convert_value(raw: str, schema: Any) -> Any:
    """A parameter's text as the value its schema asks for (text when unsure)."""
    types = _types(schema)
    if not types or types == {"string"}:
        return raw
    if raw.strip().lower() == "null" and "null" in types:
        return None
    if types & {"integer", "number"}:
        try:
            number = json.loads(raw.strip())
            if isinstance(number, (int, float)) and not isinstance(number, bool):
                return int(number) if "integer" in types and float(number).is_integer() \
                    else number
        except (json.JSONDecodeError, ValueError):
            pass
    if "boolean" in types and raw.strip().lower() in ("true", "false"):
        return raw.strip().lower() == "true"
    if types & {"object", "array", "any"}:
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, RecursionError):  # model text: maybe absurdly nested
            try:
                return ast.literal_eval(raw.strip())
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                pass
    return raw


@register_tool_parser("qwen3_xml")
class Qwen3XmlToolParser(ToolParser):

    def parse(self, text: str, final: bool) -> ToolParse:
        starts = [i for i in (text.find(_CALL_START), text.find(_FN_START)) if i >= 0]
        if not starts:
            return ToolParse(text if final else hold_partial(text, (_CALL_START, _FN_START)))
        first = min(starts)
        result = ToolParse(text[:first])
        pos = first
        while pos >= 0:
            call, pos = self._call(text, pos, final)
            if call is None:
                break
            result.calls.append(call)
        if final and (not result.calls or not all(c.complete for c in result.calls)):
            raise ToolParseError("an unfinished <function=...> block")
        return result

    def _call(self, text: str, pos: int, final: bool) -> tuple[ToolCallPart | None, int]:
        """One call from pos; returns it (None until its name is known) and the next start."""
        wrapped = text.startswith(_CALL_START, pos)
        if wrapped:
            pos = skip_ws(text, pos + len(_CALL_START))
        if not text.startswith(_FN_START, pos):
            if pos >= len(text) or (_FN_START.startswith(text[pos:]) and not final):
                return None, -1
            raise ToolParseError("expected <function=NAME>")
        name_end = text.find(">", pos)
        if name_end < 0:
            return None, -1
        name = text[pos + len(_FN_START):name_end].strip()
        if not name:
            raise ToolParseError("a <function=> without a name")
        props = self.parameters_of(name).get("properties")
        props = props if isinstance(props, dict) else {}
        parts: list[str] = []
        pos = name_end + 1
        while True:
            pos = skip_ws(text, pos)
            if text.startswith(_FN_END, pos):
                pos = skip_ws(text, pos + len(_FN_END))
                if wrapped and text.startswith(_CALL_END, pos):
                    pos += len(_CALL_END)
                arguments = "{" + ", ".join(parts) + "}"
                return ToolCallPart(name, arguments, True), self._next(text, pos)
            if not text.startswith(_PARAM_START, pos):
                if pos >= len(text) or not final and (_PARAM_START.startswith(text[pos:]) or
                                                      _FN_END.startswith(text[pos:])):
                    break
                raise ToolParseError("expected <parameter=NAME> or </function>")
            key_end = text.find(">", pos)
            if key_end < 0:
                break
            key = text[pos + len(_PARAM_START):key_end].strip()
            value_end, after = self._value_end(text, key_end + 1)
            if value_end < 0:
                break
            raw = text[key_end + 1:value_end]
            raw = raw[1:] if raw.startswith("\n") else raw
            raw = raw[:-1] if raw.endswith("\n") else raw
            value = convert_value(raw, props.get(key))
            parts.append(f"{json.dumps(key, ensure_ascii=False)}: "
                         f"{json.dumps(value, ensure_ascii=False)}")
            pos = after
        return ToolCallPart(name, "{" + ", ".join(parts) if parts else "", False), -1

    @staticmethod
    def _value_end(text: str, start: int) -> tuple[int, int]:
        """Where a parameter's value ends and parsing goes on; (-1, -1) while it may continue.
        A missing </parameter> is tolerated before the next <parameter= or </function>."""
        found = [(at, marker) for marker in (_PARAM_END, _PARAM_START, _FN_END)
                 if (at := text.find(marker, start)) >= 0]
        if not found:
            return -1, -1
        at, marker = min(found)
        return at, at + len(_PARAM_END) if marker == _PARAM_END else at

    @staticmethod
    def _next(text: str, pos: int) -> int:
        starts = [i for i in (text.find(_CALL_START, pos), text.find(_FN_START, pos)) if i >= 0]
        return min(starts) if starts else -1
