"""The think-tag reasoning parsers (`deepseek_r1`, `qwen3`) and how a prompt leaves the thinking
(API workers).

`split(text, final)` is called on the whole output so far; with `final=False` a tail that could
be the start of a tag is held back, so streamed reasoning and content only ever grow.
"""

from __future__ import annotations

from typing import ClassVar

from fornax.api.tools.base import hold_partial


def thinking_state(prompt_tail: str, start: str = "<think>", end: str = "</think>") -> str:
    """How the generation prompt leaves the thinking: "ended" (it closed it, e.g. Qwen3 with
    enable_thinking=false), "started" (it opened it, e.g. DeepSeek-R1) or "none"."""
    opened, closed = prompt_tail.rfind(start), prompt_tail.rfind(end)
    if closed >= 0 and closed > opened:
        return "ended"
    return "started" if opened >= 0 else "none"


class ReasoningParser:
    """Reasoning is the text up to `end`; an opening `start` at the output's beginning is
    dropped. Subclasses say whether an output that does not open with `start` thinks anyway."""

    name: ClassVar[str] = ""
    start: ClassVar[str] = "<think>"
    end: ClassVar[str] = "</think>"
    thinks_without_start: ClassVar[bool] = False

    def __init__(self, prompt_state: str = "none") -> None:
        self.prompt_state = prompt_state

    @property
    def active(self) -> bool:
        """False when the prompt already ended the thinking: the output is all content."""
        return self.prompt_state != "ended"

    def split(self, text: str, final: bool) -> tuple[str | None, str]:
        """(reasoning or None, content) of the output so far."""
        if not self.active:
            return None, text
        thinking = self.prompt_state == "started" or self.thinks_without_start
        body = text.lstrip()
        if body.startswith(self.start):
            thinking, text = True, body[len(self.start):]
        elif not final and (not body or self.start.startswith(body)):
            return ("" if thinking else None), ""  # too early to tell
        if not thinking:
            return None, text
        at = text.find(self.end)
        if at < 0:
            return (text if final else hold_partial(text, (self.end,))), ""
        return text[:at], text[at + len(self.end):]


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1: its template opens <think> in the prompt, so the output thinks until
    </think>; an output that never closes it is all reasoning."""

    name = "deepseek_r1"
    thinks_without_start = True


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3: thinks when the output (or the prompt) opens <think>; with enable_thinking=false
    the template closes an empty block in the prompt and the output is all content."""

    name = "qwen3"
