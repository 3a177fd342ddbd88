"""Tool calling, reasoning and output constraints of a chat request, planned together: the
server's parsers (from `fornax serve` flags), one request's plan, and the start-up flag checks
(API workers; the checks run in `fornax serve`)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Any

from fornax.api.generation.structured import backend_headers, request_constraint
from fornax.api.reasoning import ReasoningParser, get_reasoning_parser, thinking_state
from fornax.api.server.errors import APIError
from fornax.api.tools.base import ToolParser
from fornax.api.tools.choice import ToolPlan, plan_tools
from fornax.api.tools.registry import ToolParserError, get_tool_parser, load_tool_parser_plugin

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatFeatures:
    """What the server was started with: --tool-call-parser, --enable-auto-tool-choice,
    --reasoning-parser (a plugin file, if any, is loaded first)."""

    tool_parser: type[ToolParser] | None = None
    auto_tool_choice: bool = False
    reasoning_parser: type[ReasoningParser] | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> ChatFeatures:
        plugin = getattr(settings, "tool_parser_plugin", None)
        if plugin:
            load_tool_parser_plugin(plugin)
        name = getattr(settings, "tool_call_parser", None)
        reasoning = getattr(settings, "reasoning_parser", None)
        return cls(get_tool_parser(name) if name else None,
                   bool(getattr(settings, "enable_auto_tool_choice", False)),
                   get_reasoning_parser(reasoning) if reasoning else None)


def check_chat_flags(args: argparse.Namespace) -> str | None:
    """`fornax serve`: the problem with the tool/reasoning flags, if any (before loading)."""
    plugin = getattr(args, "tool_parser_plugin", None)
    parser = getattr(args, "tool_call_parser", None)
    try:
        if plugin:
            load_tool_parser_plugin(plugin)
        if parser:
            get_tool_parser(parser)
        if getattr(args, "reasoning_parser", None):
            get_reasoning_parser(args.reasoning_parser)
    except (ToolParserError, KeyError) as exc:
        return str(exc).strip("'\"")
    if getattr(args, "enable_auto_tool_choice", None) and not parser:
        return "--enable-auto-tool-choice requires --tool-call-parser"
    return None


@dataclass
class ChatPlan:
    """One chat request: how its output is read (reasoning, tool calls) and constrained."""

    tools: ToolPlan
    constraint: dict[str, Any] | None = None  # StructuredOutputsParams fields
    reasoning: type[ReasoningParser] | None = None
    reasoning_state: str = "none"  # how the prompt leaves the thinking, see thinking_state
    constraint_after: list[int] | None = None  # the end-of-thinking token ids
    param_changes: dict[str, Any] = field(default_factory=dict)
    include_reasoning: bool = True  # false: the reasoning is read but not returned

    @property
    def headers(self) -> dict[str, str]:
        return backend_headers(self.constraint)

    @property
    def shapes_output(self) -> bool:
        return self.reasoning is not None or self.tools.make_parser is not None

    def sampling_extra(self) -> dict[str, Any]:
        extra = dict(self.param_changes)
        if self.constraint is not None:
            extra["structured_outputs"] = dict(self.constraint)
            if self.constraint_after:
                extra["structured_outputs_after"] = list(self.constraint_after)
        return extra


def plan_chat(features: ChatFeatures, body: Any) -> ChatPlan:
    """Check tools, tool_choice and constraints (400s name the field) and plan the request."""
    constraint = request_constraint(body)
    _check_strict(body.tools)
    tools = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls,
                       parser=features.tool_parser, auto_enabled=features.auto_tool_choice)
    if tools.constraint is not None:
        if constraint is not None:
            raise APIError(400, f"tool_choice {tools.mode!r} forces its own output format and "
                           "cannot be combined with response_format or structured_outputs",
                           "tool_choice")
        constraint = tools.constraint
    if body.use_beam_search and (constraint is not None or tools.mode != "none"):
        raise APIError(400, "beam search cannot follow an output constraint or call tools",
                       "use_beam_search")
    plan = ChatPlan(tools, constraint, features.reasoning_parser,
                    include_reasoning=getattr(body, "include_reasoning", True))
    if tools.make_parser is not None:
        tools.make_parser().adjust_params(plan.param_changes)
    return plan


def _check_strict(tools: Any) -> None:
    """tools[i].function.strict is a boolean. Its effect: under tool_choice required or named
    the arguments already follow their schema (a grammar); under auto it is a hint."""
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):
        fn = tool.get("function") if isinstance(tool, dict) else None
        strict = fn.get("strict") if isinstance(fn, dict) else None
        if strict is not None and not isinstance(strict, bool):
            raise APIError(400, f"tools[{i}].function.strict must be a boolean",
                           f"tools[{i}].function.strict")


def template_kwargs(body: Any) -> dict[str, Any] | None:
    """The chat template's extra variables: the request's chat_template_kwargs, plus vLLM's
    reasoning_effort (in the context as is, and as enable_thinking=false for "none" / true
    otherwise unless the request set enable_thinking itself)."""
    kwargs = body.chat_template_kwargs
    effort = getattr(body, "reasoning_effort", None)
    if effort is None:
        return kwargs
    merged = dict(kwargs or {})
    merged["reasoning_effort"] = effort
    merged.setdefault("enable_thinking", effort != "none")
    return merged


def thinking_budget_params(budget: int | None, cls: type[ReasoningParser] | None,
                           reasoning_state: str, tokenizer: Any) -> dict[str, Any]:
    """thinking_token_budget -> the engine's forced end of thinking (SamplingParams fields);
    -1 or none: unlimited. A server without --reasoning-parser cannot tell the thinking apart:
    a 400 naming the field."""
    if budget is None or budget == -1:
        return {}
    if cls is None:
        raise APIError(400, "thinking_token_budget needs a server started with "
                       "--reasoning-parser (it says where the thinking ends)",
                       "thinking_token_budget")
    if reasoning_state == "ended":
        return {}  # the prompt closed the thinking: nothing to bound
    out: dict[str, Any] = {"thinking_token_budget": budget,
                           "thinking_end_ids": tokenizer.encode(cls.end, add_special_tokens=False)}
    if reasoning_state == "none" and not cls.thinks_without_start:
        out["thinking_start_ids"] = tokenizer.encode(cls.start, add_special_tokens=False)
    return out


def resolve_thinking(plan: ChatPlan, state: Any, body: Any, prompt_text: str) -> None:
    """After rendering: where the prompt leaves the thinking, and so where a constraint starts
    (after the end-of-thinking marker, unless the prompt already closed the thinking), and the
    thinking_token_budget's forced end."""
    cls = plan.reasoning
    if cls is not None:
        plan.reasoning_state = thinking_state(_generation_tail(state, body, prompt_text),
                                              cls.start, cls.end)
        if plan.constraint is not None and plan.reasoning_state != "ended":
            plan.constraint_after = state.tokenizer.encode(cls.end, add_special_tokens=False)
    plan.param_changes.update(thinking_budget_params(
        body.thinking_token_budget, cls, plan.reasoning_state, state.tokenizer))


def _generation_tail(state: Any, body: Any, prompt_text: str) -> str:
    """The part of the prompt after the conversation: what the generation prompt added (or the
    final assistant message that continue_final_message continues)."""
    if body.continue_final_message or not body.add_generation_prompt:
        content = body.messages[-1].get("content") if body.messages else None
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""
    try:
        from fornax.api.tools.messages import prepare_messages

        base = state.tokenizer.apply_chat_template(
            prepare_messages(body.messages), add_generation_prompt=False, tools=body.tools,
            documents=body.documents, chat_template=body.chat_template,
            content_format=state.settings.chat_template_content_format,
            template_kwargs=template_kwargs(body))
    except Exception:  # a template that needs the generation prompt: look at the end only
        logger.debug("rendering without the generation prompt failed", exc_info=True)
        return prompt_text[-64:]
    return prompt_text[len(base):] if prompt_text.startswith(base) else prompt_text[-64:]
