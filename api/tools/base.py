"""What a tool parser returns, its base class and the helpers parsers share (API workers).

A parser turns the text a model wrote into plain content and tool calls. `parse(text, final)` is
called on the whole text so far, again and again while a response streams: with `final=False` it
returns what is certain (content that cannot be the start of a call, calls whose name is known,
and argument text that only grows), so the streaming code sends differences and never retracts
anything. With `final=True` a malformed call raises ToolParseError, and the response keeps the
whole text as content.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, ClassVar


class ToolParseError(ValueError):
    """The text starts a tool call but is not a well-formed one."""


@dataclass
class ToolCallPart:
    """One call: its function name and arguments as JSON text (a prefix while incomplete)."""

    name: str
    arguments: str
    complete: bool = True


@dataclass
class ToolParse:
    content: str
    calls: list[ToolCallPart] = field(default_factory=list)


class ToolParser:
    """Base class: subclasses set `name` and implement `parse`; register them in the registry."""

    name: ClassVar[str] = ""
    id_style: ClassVar[str] = "openai"  # "mistral": 9 alphanumerics, as Mistral templates require

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        self.tools = tools or []

    def adjust_params(self, changes: dict[str, Any]) -> None:
        """Change the request's sampling fields (e.g. keep special tokens the format uses)."""

    def parse(self, text: str, final: bool) -> ToolParse:
        raise NotImplementedError

    def extract(self, text: str) -> ToolParse:
        """The final split of a whole output: well-formed calls, or everything as content."""
        try:
            result = self.parse(text, True)
        except (ToolParseError, ValueError, RecursionError):
            return ToolParse(text, [])
        for call in result.calls:
            if not call.complete:
                return ToolParse(text, [])
            try:
                check_arguments(call.arguments)
            except ToolParseError:
                return ToolParse(text, [])
        return result

    def parameters_of(self, name: str) -> dict[str, Any]:
        """The JSON schema of a tool's parameters ({} when unknown)."""
        for tool in self.tools:
            fn = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(fn, dict) and fn.get("name") == name:
                params = fn.get("parameters")
                return params if isinstance(params, dict) else {}
        return {}


def check_arguments(arguments: str) -> None:
    """Arguments must be a JSON object."""
    try:
        value = json.loads(arguments)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ToolParseError(f"tool-call arguments are not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ToolParseError("tool-call arguments must be a JSON object")


def hold_partial(text: str, markers: tuple[str, ...]) -> str:
    """`text` without a tail that could be the start of one of `markers` (kept for later)."""
    cut = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), cut, -1):
            if text.endswith(marker[:k]):
                cut = k
                break
    return text[: len(text) - cut] if cut else text


def new_tool_call_id(style: str = "openai") -> str:
    if style == "mistral":
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(9))
    return f"chatcmpl-tool-{secrets.token_hex(16)}"


def dump_arguments(values: dict[str, Any]) -> str:
    return json.dumps(values, ensure_ascii=False)
