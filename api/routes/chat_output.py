"""One chat choice's text as reasoning, content and tool calls: the whole message, or streamed
deltas that only ever add (API workers)."""

from __future__ import annotations

from typing import Any

from fornax.api.protocol.openai import ChatMessage, DeltaMessage, DeltaToolCall
from fornax.api.routes.chat_features import ChatPlan
from fornax.api.tools.base import new_tool_call_id
from fornax.api.tools.stream import ToolStream


class ChoiceShaper:
    """Reads one choice's output per the plan (reasoning parser, tool parser)."""

    def __init__(self, plan: ChatPlan) -> None:
        self.plan = plan
        self.reasoning = plan.reasoning(plan.reasoning_state) if plan.reasoning else None
        self.tool_parser = plan.tools.make_parser() if plan.tools.make_parser else None
        self.stream = ToolStream(self.tool_parser, plan.tools.parallel, plan.tools.id_style) \
            if self.tool_parser is not None else None
        self.text = ""
        self.reasoning_sent = ""
        self.content_sent = ""

    def _split(self, text: str, final: bool) -> tuple[str | None, str]:
        if self.reasoning is None:
            return None, text
        reasoning, content = self.reasoning.split(text, final)
        return (reasoning if self.plan.include_reasoning else None), content

    def _finish(self, finish_reason: str | None, num_calls: int) -> str | None:
        if num_calls and finish_reason == "stop" and self.plan.tools.finish_as_tool_calls:
            return "tool_calls"
        return finish_reason

    # ---- whole responses -----------------------------------------------------------------------
    def message(self, text: str, finish_reason: str | None,
                echo: str = "") -> tuple[ChatMessage, str | None]:
        """The assistant message for a finished choice and its finish_reason."""
        reasoning, content = self._split(text, True)
        tool_calls: list[dict[str, Any]] = []
        if self.tool_parser is not None:
            result = self.tool_parser.extract(content)
            calls = result.calls if self.plan.tools.parallel else result.calls[:1]
            content = result.content
            tool_calls = [{"id": new_tool_call_id(self.plan.tools.id_style), "type": "function",
                           "function": {"name": c.name, "arguments": c.arguments}}
                          for c in calls]
        text_out: str | None = echo + content
        if (tool_calls and not echo and not content.strip()) or (
                not text_out and reasoning is not None):
            text_out = None
        return (ChatMessage("assistant", text_out, tool_calls, reasoning),
                self._finish(finish_reason, len(tool_calls)))

    # ---- streams -------------------------------------------------------------------------------
    def delta(self, new_text: str, finish_reason: str | None
              ) -> tuple[DeltaMessage | None, str | None]:
        """What to send for `new_text` (None: nothing yet) and the finish_reason to report."""
        if not self.plan.shapes_output:
            return DeltaMessage(content=new_text), finish_reason
        final = finish_reason is not None
        self.text += new_text
        reasoning, content = self._split(self.text, final)
        reasoning_delta = self._grow("reasoning_sent", reasoning or "")
        calls: list[DeltaToolCall] = []
        if self.stream is not None:
            content_delta, calls = self.stream.update(content, final)
        else:
            content_delta = self._grow("content_sent", content)
        num_calls = self.stream.num_calls if self.stream is not None else 0
        if not (reasoning_delta or content_delta or calls):
            return (DeltaMessage() if final else None), self._finish(finish_reason, num_calls)
        return (DeltaMessage(content=content_delta or None, reasoning=reasoning_delta or None,
                             tool_calls=calls or None),
                self._finish(finish_reason, num_calls))

    def _grow(self, attr: str, now: str) -> str:
        sent = getattr(self, attr)
        if len(now) <= len(sent) or not now.startswith(sent):
            return ""
        setattr(self, attr, now)
        return now[len(sent):]
