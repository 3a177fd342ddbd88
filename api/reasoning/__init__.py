"""Reasoning parsers: split a thinking model's output into `reasoning` and `content`, by name
(`--reasoning-parser`), with room for more (API workers)."""

from __future__ import annotations

from fornax.api.reasoning.parsers import (
    DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser,
    ReasoningParser,
    thinking_state,
)

_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "qwen3": Qwen3ReasoningParser,
}


def register_reasoning_parser(name: str, cls: type[ReasoningParser]) -> None:
    _PARSERS[name] = cls


def reasoning_parser_names() -> list[str]:
    return sorted(_PARSERS)


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    cls = _PARSERS.get(name)
    if cls is None:
        raise KeyError(f"unknown reasoning parser {name!r}; available: "
                       f"{', '.join(sorted(_PARSERS))}")
    return cls


__all__ = ["ReasoningParser", "get_reasoning_parser", "reasoning_parser_names",
           "register_reasoning_parser", "thinking_state"]
