"""The `pythonic` tool-call format (Llama 3.2/4, ToolACE): the output is a Python list of calls,
`[get_weather(city="Paris"), get_time()]`, optionally inside <|python_start|>...<|python_end|>
(API workers). Arguments are keyword literals; each call's arguments are sent, as JSON, once the
call's closing parenthesis arrives."""

from __future__ import annotations

import ast
from typing import Any

from fornax.api.tools.base import (
    ToolCallPart,
    ToolParse,
    ToolParseError,
    ToolParser,
    dump_arguments,
)
from fornax.api.tools.json_scan import calls_start, scan_brackets, skip_ws
from fornax.api.tools.registry import register_tool_parser

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")
_JSON_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False,
               "None": None}


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, type(None))):
        return node.value
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        keys = [k for k in node.keys if k is not None]
        if len(keys) != len(node.keys):
            raise ToolParseError("** in a tool-call argument")
        return {_literal(k): _literal(v) for k, v in zip(keys, node.values, strict=True)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    raise ToolParseError(f"tool-call arguments must be literals, got {ast.dump(node)[:60]}")


def _call_arguments(source: str) -> str:
    try:
        node = ast.parse(source.strip(), mode="eval").body
    except SyntaxError as exc:
        raise ToolParseError(f"not a Python call: {exc}") from exc
    if not isinstance(node, ast.Call) or node.args:
        raise ToolParseError("a tool call takes keyword arguments only")
    values = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise ToolParseError("** in a tool call")
        values[kw.arg] = _literal(kw.value)
    return dump_arguments(values)


def _skip_string(text: str, j: int) -> int | None:
    """End (exclusive) of the Python string literal starting at text[j]; None if cut short."""
    c = text[j]
    quote = c * 3 if text.startswith(c * 3, j) else c
    j += len(quote)
    n = len(text)
    while j < n and not text.startswith(quote, j):
        j += 2 if text[j] == "\\" else 1
    return None if j >= n else j + len(quote)


def _close_paren(text: str, i: int) -> int | None:
    """Index after the ')' closing the '(' at text[i], skipping Python strings; None if open."""
    return scan_brackets(text, i, "([{", ")]}", "\"'", _skip_string)


@register_tool_parser("pythonic")
class PythonicToolParser(ToolParser):
    start_tag = "<|python_start|>"
    end_tag = "<|python_end|>"

    def parse(self, text: str, final: bool) -> ToolParse:
        j = calls_start(text, self.start_tag, "[", final, check_after_tag=True)
        if isinstance(j, ToolParse):
            return j
        return self._calls(text, j, final)

    def _calls(self, text: str, j: int, final: bool) -> ToolParse:
        result = ToolParse("")
        j += 1
        closed = False
        while True:
            j = skip_ws(text, j)
            if j >= len(text):
                break
            if text[j] == "]":
                closed, j = True, j + 1
                break
            if text[j] == "," and result.calls:
                j += 1
                continue
            k = j
            while k < len(text) and text[k] in _NAME_CHARS:
                k += 1
            if k >= len(text):
                break  # the name is still being written
            if k == j or text[k] != "(":
                raise ToolParseError("expected name(...) in a list of tool calls")
            name = text[j:k]
            end = _close_paren(text, k)
            if end is None:
                result.calls.append(ToolCallPart(name, "", False))
                break
            result.calls.append(ToolCallPart(name, _call_arguments(text[j:end]), True))
            j = end
        if final:
            tail = text[j:].strip()
            if tail.startswith(self.end_tag):
                tail = tail[len(self.end_tag):].strip()
            if not closed or tail or not result.calls:
                raise ToolParseError("not a closed list of tool calls")
        return result
