"""Streamed tool calls: re-parse the content so far and send only what is new, in OpenAI's chunk
shape (first the call's id and name, then argument fragments) (API workers)."""

from __future__ import annotations

import logging

from fornax.api.protocol.openai import DeltaFunctionCall, DeltaToolCall
from fornax.api.tools.base import (
    ToolCallPart,
    ToolParse,
    ToolParseError,
    ToolParser,
    new_tool_call_id,
)

logger = logging.getLogger(__name__)


class ToolStream:
    """The tool-call side of one streamed choice."""

    def __init__(self, parser: ToolParser, parallel: bool, id_style: str) -> None:
        self.parser = parser
        self.parallel = parallel
        self.id_style = id_style
        self.content_sent = ""
        self.sent: list[tuple[str, str]] = []  # per call: (id, arguments sent)

    @property
    def num_calls(self) -> int:
        return len(self.sent)

    def update(self, content: str, final: bool) -> tuple[str, list[DeltaToolCall]]:
        """(new plain content, new tool-call deltas) given all the content so far."""
        if final:
            result = self.parser.extract(content)
        else:
            try:
                result = self.parser.parse(content, False)
            except (ToolParseError, ValueError, RecursionError):
                return "", []  # malformed so far: the final parse decides
        return self._content_delta(result), self._call_deltas(result.calls)

    def _content_delta(self, result: ToolParse) -> str:
        if not result.content.startswith(self.content_sent):
            logger.debug("tool parser content went back; not re-sending it")
            return ""
        delta = result.content[len(self.content_sent):]
        self.content_sent = result.content
        return delta

    def _call_deltas(self, calls: list[ToolCallPart]) -> list[DeltaToolCall]:
        if not self.parallel:
            calls = calls[:1]
        deltas = []
        for i, call in enumerate(calls):
            if i >= len(self.sent):
                call_id = new_tool_call_id(self.id_style)
                self.sent.append((call_id, call.arguments))
                deltas.append(DeltaToolCall(i, call_id, "function",
                                            DeltaFunctionCall(call.name, call.arguments)))
                continue
            call_id, sent = self.sent[i]
            if len(call.arguments) > len(sent) and call.arguments.startswith(sent):
                self.sent[i] = (call_id, call.arguments)
                deltas.append(DeltaToolCall(i, function=DeltaFunctionCall(
                    arguments=call.arguments[len(sent):])))
        return deltas
