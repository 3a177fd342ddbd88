"""A chat request's `tools`, `tool_choice` and `parallel_tool_calls`, checked and turned into a
plan: which parser reads the output and which constraint (if any) forces a call (API workers)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fornax.api.server.errors import APIError
from fornax.api.tools.base import ToolParser
from fornax.api.tools.forced import (
    NamedToolParser,
    RequiredToolParser,
    required_schema,
    tool_parameters,
)

AUTO_NEEDS_FLAGS = ('"auto" tool choice requires --enable-auto-tool-choice and '
                    "--tool-call-parser to be set")


@dataclass
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    make_parser: Callable[[], ToolParser] | None = None  # one parser per choice (stream state)
    constraint: dict[str, Any] | None = None  # StructuredOutputsParams fields forcing the call
    parallel: bool = True
    id_style: str = "openai"

    @property
    def finish_as_tool_calls(self) -> bool:
        """vLLM: "tool_calls" when auto or required produced calls; a named choice says stop."""
        return self.mode in ("auto", "required")


def check_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list", "tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type", "function") != "function":
            raise APIError(400, f'tools[{i}] must be {{"type": "function", "function": {{...}}}}',
                           f"tools[{i}]")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"tools[{i}].function.name must be a non-empty string",
                           f"tools[{i}].function.name")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object",
                           f"tools[{i}].function.parameters")
    return tools


def _forced(schema: dict[str, Any]) -> dict[str, Any]:
    """A forced call is read by a machine: JSON with xgrammar's ", " and ": " separators (what
    models trained on json.dumps write anyway) and no free whitespace to wander in."""
    return {"json": schema, "disable_any_whitespace": True, "source": "tools"}


def _named(choice: dict[str, Any]) -> str:
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
    if choice.get("type", "function") != "function" or not isinstance(name, str) or not name:
        raise APIError(400, 'a named tool_choice is {"type": "function", "function": {"name": '
                       '...}}', "tool_choice")
    return name


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool | None, *,
               parser: type[ToolParser] | None, auto_enabled: bool) -> ToolPlan:
    """The plan for one request; `parser` is the server's --tool-call-parser (auto tool choice
    also needs --enable-auto-tool-choice)."""
    parallel = True if parallel is None else bool(parallel)
    ids = parser.id_style if parser is not None else "openai"
    if tools is not None:
        tools = check_tools(tools)
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if tool_choice == "none":
        return ToolPlan("none")
    if isinstance(tool_choice, str) and tool_choice not in ("auto", "required"):
        raise APIError(400, f"tool_choice must be none, auto, required or a named function, got "
                       f"{tool_choice!r}", "tool_choice")
    if not tools:
        if tool_choice == "auto":
            return ToolPlan("none")
        raise APIError(400, "tool_choice needs `tools`", "tool_choice")
    if tool_choice == "auto":
        if parser is None or not auto_enabled:
            raise APIError(400, AUTO_NEEDS_FLAGS, "tool_choice")
        auto = parser
        return ToolPlan("auto", lambda: auto(tools), parallel=parallel, id_style=ids)
    if tool_choice == "required":
        return ToolPlan("required", lambda: RequiredToolParser(tools),
                        _forced(required_schema(tools, parallel)), parallel, ids)
    if not isinstance(tool_choice, dict):
        raise APIError(400, "tool_choice must be a string or an object", "tool_choice")
    name = _named(tool_choice)
    tool = next((t for t in tools if t["function"]["name"] == name), None)
    if tool is None:
        raise APIError(400, f"tool_choice names {name!r}, which is not in tools", "tool_choice")
    return ToolPlan("named", lambda: NamedToolParser(tools, name),
                    _forced(tool_parameters(tool)), parallel, ids)
