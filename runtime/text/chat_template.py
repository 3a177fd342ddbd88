"""Chat templates rendered in a jinja2 sandbox, HF-compatible (API workers and offline LLM)."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fornax.runtime.errors import RequestError


class ChatTemplateError(RequestError):
    """The template failed to render (it raised, or the conversation does not fit it)."""


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile once per distinct template text."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}",
                                "chat_template") from exc


def detect_content_format(source: str) -> str:
    """'openai' when the template iterates over message content parts, else 'string'."""
    text = source.replace(" ", "")
    markers = ("message['content']isiterable", "message.contentisiterable",
               "forcontentinmessage['content']", "forcontentinmessage.content",
               "forpartinmessage['content']", "forpartinmessage.content",
               "message['content']isnotstring", "message.contentisnotstring",
               "forcinmessage['content']", "forcinmessage.content")
    return "openai" if any(m in text for m in markers) else "string"


def normalize_messages(messages: list[dict[str, Any]], content_format: str) -> list[dict[str, Any]]:
    """Give each message's content the shape the template expects (string or list of parts)."""
    out = []
    for msg in messages:
        msg = dict(msg)
        content = msg.get("content")
        if content_format == "string" and isinstance(content, list):
            texts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") in ("text", "input_text"):
                    texts.append(str(part.get("text", "")))
                elif isinstance(part, str):
                    texts.append(part)
                else:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise RequestError(f"content part of type {kind!r} is not supported by this "
                                       "text-only model", "messages")
            msg["content"] = "\n".join(texts)
        elif content_format == "openai" and isinstance(content, str):
            msg["content"] = [{"type": "text", "text": content}]
        out.append(msg)
    return out


def render_chat(source: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
                documents: list[dict[str, Any]] | None = None, content_format: str = "auto",
                special_tokens: dict[str, str] | None = None,
                template_kwargs: dict[str, Any] | None = None) -> str:
    """The prompt text for a conversation, as HF's `apply_chat_template(tokenize=False)` gives."""
    if add_generation_prompt and continue_final_message:
        raise RequestError("add_generation_prompt and continue_final_message cannot both be true",
                           "continue_final_message")
    if continue_final_message and (not messages or messages[-1].get("role") != "assistant"):
        raise RequestError("continue_final_message needs a final assistant message",
                           "continue_final_message")
    fmt = detect_content_format(source) if content_format == "auto" else content_format
    msgs = normalize_messages(messages, fmt)
    context: dict[str, Any] = dict(special_tokens or {})
    context.update(template_kwargs or {})
    context.update(messages=msgs, add_generation_prompt=add_generation_prompt)
    if tools is not None:
        context["tools"] = tools
    if documents is not None:
        context["documents"] = documents
    try:
        text = compile_template(source).render(**context)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template error: {exc}", "messages") from exc
    except (TypeError, KeyError, AttributeError, IndexError) as exc:
        raise ChatTemplateError(f"the conversation does not fit the chat template: {exc}",
                                "messages") from exc
    if continue_final_message:
        final = msgs[-1].get("content")
        if isinstance(final, list):
            final = "".join(p.get("text", "") for p in final if isinstance(p, dict))
        if final and final.strip() and final.strip() in text:
            idx = text.rindex(final.strip())
            text = text[: idx + len(final.strip())]
    return text
