"""A tolerant scanner over JSON text that may be cut short, for tool calls written as JSON objects
(`{"name": ..., "arguments": {...}}`) while they stream (API workers).

It finds where values start and end without building them, so argument text can be passed on as
the model wrote it and only ever grows; complete values are checked with `json.loads` later.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from fornax.api.tools.base import ToolCallPart, ToolParse, ToolParseError

WHITESPACE = " \t\r\n"
_SCALAR_END = ",}] \t\r\n"


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in WHITESPACE:
        i += 1
    return i


def scan_string(text: str, i: int) -> int | None:
    """End (exclusive) of the JSON string starting at text[i] == '"'; None if it is cut short."""
    j = i + 1
    n = len(text)
    while j < n:
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == '"':
            return j + 1
        j += 1
    return None


def scan_brackets(text: str, i: int, opens: str, closes: str, quotes: str,
                  skip_string: Callable[[str, int], int | None]) -> int | None:
    """End (exclusive) of the bracketed value opening at text[i]: brackets counted, strings
    (from a `quotes` character to where `skip_string` ends them) skipped; None while open."""
    depth = 0
    j = i
    n = len(text)
    while j < n:
        c = text[j]
        if c in quotes:
            end = skip_string(text, j)
            if end is None:
                return None
            j = end
            continue
        if c in opens:
            depth += 1
        elif c in closes:
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return None


def calls_start(text: str, tag: str, first: str, final: bool, *, check_after_tag: bool = False
                ) -> int | ToolParse:
    """Where the calls of a tool-call output start (after whitespace and an optional `tag`),
    or what to answer instead: the text itself when it is plain text (it does not start with
    `first`), nothing yet while it may still become the tag."""
    j = skip_ws(text, 0)
    rest = text[j:]
    if rest.startswith(tag):
        j = skip_ws(text, j + len(tag))
        if not check_after_tag:
            return j
        rest = text[j:]
    if not rest or (tag.startswith(rest) and not final):
        return ToolParse(text if final else "")
    if rest[0] != first:
        return ToolParse(text)  # plain text: not a call
    return j


def scan_value(text: str, i: int) -> int | None:
    """End (exclusive) of the JSON value starting at text[i]; None if the text ends first."""
    c = text[i]
    if c == '"':
        return scan_string(text, i)
    if c in "{[":
        return scan_brackets(text, i, "{[", "}]", '"', scan_string)
    if c not in "-0123456789tfn":
        raise ToolParseError(f"unexpected {c!r} where a JSON value should start")
    j = i
    while j < len(text) and text[j] not in _SCALAR_END:
        j += 1
    return None if j == len(text) else j


@dataclass
class ObjectScan:
    """The fields of a JSON object seen so far: key -> (value start, value end or None)."""

    fields: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    end: int | None = None  # after the closing brace, once seen


def scan_object(text: str, i: int) -> ObjectScan:
    """Scan the object starting at text[i] == '{' as far as the text goes."""
    scan = ObjectScan()
    j = i + 1
    while True:
        j = skip_ws(text, j)
        if j >= len(text):
            return scan
        c = text[j]
        if c == "}":
            scan.end = j + 1
            return scan
        if c == "," and scan.fields:
            j += 1
            continue
        if c != '"':
            raise ToolParseError(f"unexpected {c!r} in a JSON object")
        key_end = scan_string(text, j)
        if key_end is None:
            return scan
        key = json.loads(text[j:key_end])
        j = skip_ws(text, key_end)
        if j >= len(text):
            return scan
        if text[j] != ":":
            raise ToolParseError("expected ':' after a key in a JSON object")
        j = skip_ws(text, j + 1)
        if j >= len(text):
            scan.fields[key] = (j, None)
            return scan
        end = scan_value(text, j)
        scan.fields[key] = (j, end)
        if end is None:
            return scan
        j = end


def call_from_object(text: str, scan: ObjectScan, args_keys: tuple[str, ...] = (
        "arguments", "parameters")) -> ToolCallPart | None:
    """The call an object describes so far; None until its name is known."""
    name_at = scan.fields.get("name")
    if name_at is None or name_at[1] is None:
        return None
    name = json.loads(text[name_at[0]:name_at[1]])
    if not isinstance(name, str) or not name:
        raise ToolParseError("a tool call's name must be a non-empty string")
    arguments = ""
    for key in args_keys:
        at = scan.fields.get(key)
        if at is None:
            continue
        start, end = at
        if end is None:  # still being written: pass on what there is (objects only)
            arguments = text[start:] if start < len(text) and text[start] in "{[" else ""
        elif text[start] == '"':  # arguments given as a string holding JSON
            arguments = json.loads(text[start:end])
        else:
            arguments = text[start:end]
        break
    else:
        if scan.end is not None:
            arguments = "{}"
    return ToolCallPart(name, arguments, scan.end is not None)


def scan_call_list(text: str, i: int, final: bool, args_keys: tuple[str, ...] = (
        "arguments", "parameters")) -> tuple[list[ToolCallPart], int | None]:
    """Calls in a JSON array of call objects starting at text[i] == '['; returns the calls and
    the end of the array (None while open)."""
    calls: list[ToolCallPart] = []
    j = i + 1
    while True:
        j = skip_ws(text, j)
        if j >= len(text):
            break
        c = text[j]
        if c == "]":
            return calls, j + 1
        if c == "," and calls:
            j += 1
            continue
        if c != "{":
            raise ToolParseError(f"unexpected {c!r} in a list of tool calls")
        scan = scan_object(text, j)
        call = call_from_object(text, scan, args_keys)
        if call is None:
            break
        calls.append(call)
        if scan.end is None:
            break
        j = scan.end
    if final:
        raise ToolParseError("the list of tool calls is not closed")
    return calls, None
