"""POST /v1/chat/completions: chat template -> engine -> JSON or SSE (API workers)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from fornax.api.generation.beam import beam_search, start_beam
from fornax.api.generation.generate import Generation, PromptInput, Updates, begin_generation
from fornax.api.generation.logprobs import chat_logprobs, prompt_logprobs_json
from fornax.api.generation.output import collect, sse_stream
from fornax.api.generation.sampling import check_unsupported, front_max_tokens, front_prompt
from fornax.api.protocol.openai import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatStreamChoice,
    DeltaMessage,
    UsageInfo,
)
from fornax.api.routes.chat_features import ChatPlan, plan_chat, resolve_thinking, template_kwargs
from fornax.api.routes.chat_output import ChoiceShaper
from fornax.api.server.errors import APIError, from_validation_error
from fornax.api.server.http import Request, Response, StreamingResponse, json_response
from fornax.api.server.offload import prepare
from fornax.api.server.state import AppState
from fornax.api.tools.messages import prepare_messages
from fornax.runtime.errors import RequestError

logger = logging.getLogger(__name__)


_TEXT_PARTS = ("text", "input_text")


def check_messages(messages: list[dict[str, Any]]) -> None:
    if not messages:
        raise APIError(400, "messages must contain at least one message", "messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg.get("role"), str):
            raise APIError(400, f"messages[{i}] needs a string 'role'", f"messages[{i}].role")
        content = msg.get("content")
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in _TEXT_PARTS and not isinstance(part, str):
                    raise APIError(400, f"messages[{i}]: content parts of type {kind!r} are not "
                                   "supported by this text-only model", "messages")


def render_prompt(state: AppState, messages: list[dict[str, Any]], *, add_generation_prompt: bool,
                  continue_final_message: bool, tools: list[dict[str, Any]] | None,
                  documents: list[dict[str, Any]] | None, chat_template: str | None,
                  template_kwargs: dict[str, Any] | None, add_special_tokens: bool
                  ) -> tuple[str, list[int]]:
    """The chat prompt's text and token ids (RequestError -> 400 naming the field)."""
    check_messages(messages)
    messages = prepare_messages(messages)  # tool-call arguments as objects, reasoning_content
    if chat_template is not None and not state.settings.trust_request_chat_template:
        raise APIError(400, "chat templates in requests are refused unless the server runs with "
                       "--trust-request-chat-template", "chat_template")
    try:
        text = state.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tools=tools, documents=documents,
            chat_template=chat_template,
            content_format=state.settings.chat_template_content_format,
            template_kwargs=template_kwargs)
    except RequestError as exc:
        raise APIError(400, str(exc), exc.param) from None
    except Exception as exc:  # a template can raise anything (OverflowError from range(), ...)
        raise APIError(400, f"the chat template failed: {type(exc).__name__}: {exc}",
                       "messages") from None
    return text, state.tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _echo_text(body: ChatCompletionRequest) -> str:
    last = body.messages[-1]
    if not body.echo or last.get("role") != "assistant":
        return ""
    content = last.get("content")
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


ChatAnswer = ChatCompletionResponse | AsyncIterator[ChatCompletionChunk]


def chat_request(body: dict[str, Any]) -> ChatCompletionRequest:
    """A chat request built by another surface (Anthropic, Responses, batch) as the typed struct,
    checked as the JSON route checks its body (400 naming the field)."""
    try:
        return msgspec.convert(body, ChatCompletionRequest)
    except msgspec.ValidationError as exc:
        raise from_validation_error(exc) from None


def as_stream(answer: ChatAnswer) -> AsyncIterator[ChatCompletionChunk]:
    """The chunks of an answer asked for with `stream` (beam search answers whole: a 500)."""
    if isinstance(answer, ChatCompletionResponse):
        raise APIError(500, "internal server error")
    return answer


async def as_response(answer: ChatAnswer) -> ChatCompletionResponse:
    """The whole answer of a request asked for without `stream`."""
    if not isinstance(answer, ChatCompletionResponse):
        await answer.aclose()  # type: ignore[attr-defined]
        raise APIError(500, "internal error: a streamed answer where JSON was expected")
    return answer


async def chat_completions(req: Request) -> Response:
    body = await req.json(ChatCompletionRequest)
    answer, headers = await run_chat(req, body)
    if isinstance(answer, ChatCompletionResponse):
        return json_response(answer, headers=headers)
    return StreamingResponse(sse_stream(answer, headers["x-request-id"]), headers=headers)


async def prepare_chat(req: Request, body: ChatCompletionRequest
                       ) -> tuple[str, ChatPlan, str, list[int], int]:
    """What the engine would get for a chat request, checked: (model name, tool/reasoning plan,
    prompt text, prompt token ids, max_tokens). Shared by run_chat and the render route."""
    state = req.state
    model = state.resolve_model(body.model)
    check_unsupported(body, structured=True)
    plan = plan_chat(state.chat_features, body)
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
    if body.top_logprobs is not None and body.top_logprobs < 0:  # the limit: SamplingParams
        raise APIError(400, "top_logprobs must be >= 0", "top_logprobs")
    text, ids = await prepare(
        req, render_prompt, state, body.messages,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message, tools=body.tools,
        documents=body.documents, chat_template=body.chat_template,
        template_kwargs=template_kwargs(body), add_special_tokens=body.add_special_tokens)
    ids = front_prompt(state, ids, body.truncate_prompt_tokens, "messages", body.truncation_side)
    resolve_thinking(plan, state, body, text)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = front_max_tokens(state, getattr(body, param), len(ids), param,
                                  state.sampling_defaults.get("max_tokens"))
    return model, plan, text, ids, max_tokens


async def run_chat(req: Request, body: ChatCompletionRequest, *, detached: bool = False
                   ) -> tuple[ChatAnswer, dict[str, str]]:
    """The typed entry of the chat path (the route and every surface built on it): the whole
    answer, or (with `stream`) its chunks once the engine has accepted the request, so a refusal
    is raised here; and the response headers. `detached`: a client disconnect does not abort it
    (background work). A failure mid-stream raises APIError from the chunk iterator."""
    model, plan, text, ids, max_tokens = await prepare_chat(req, body)
    if body.use_beam_search:
        return await _beam(req, body, model, ids, max_tokens, detached), {}
    gen, public_id, created = begin_generation(
        req, body, "chatcmpl", [PromptInput(ids, text)], max_tokens=max_tokens,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        extra=plan.sampling_extra(), logprobs_param="top_logprobs", watch=not detached)
    headers = {"x-request-id": public_id, **plan.headers}
    if body.stream:
        updates = await gen.start()
        return _chunks(gen, body, model, public_id, created, updates, plan,
                       text if body.return_prompt_text else None), headers
    answer = await _complete(gen, body, model, public_id, created, plan)
    if body.return_prompt_text:
        answer.prompt_text = text
    return answer, headers


async def _beam(req: Request, body: ChatCompletionRequest, model: str, ids: list[int],
                max_tokens: int, detached: bool) -> ChatCompletionResponse:
    """use_beam_search: the n best beams (not streamed)."""
    if body.logprobs:
        raise APIError(400, "beam search returns no logprobs", "use_beam_search")
    public_id = start_beam(req, body, "chatcmpl", max_tokens, watch=not detached)
    beams = await beam_search(req.state, ids, body, max_tokens)
    choices = [ChatChoice(i, ChatMessage("assistant", b.text), None, b.finish_reason)
               for i, b in enumerate(beams)]
    completion = sum(len(b.token_ids) for b in beams)
    return ChatCompletionResponse(public_id, int(time.time()), model, choices,
                                  UsageInfo(len(ids), len(ids) + completion, completion))


async def _complete(gen: Generation, body: ChatCompletionRequest, model: str, public_id: str,
                    created: int, plan: ChatPlan) -> ChatCompletionResponse:
    echo = _echo_text(body)
    as_ids = bool(body.return_tokens_as_token_ids)
    choices = []
    for i, c in enumerate(await collect(gen)):
        message, finish = ChoiceShaper(plan).message(c.text, c.finish_reason, echo)
        lps = chat_logprobs(c.logprobs, body.top_logprobs or 0, as_ids) if body.logprobs else None
        choices.append(ChatChoice(i, message, lps, finish, c.stop_reason,
                                  c.token_ids if body.return_token_ids else None))
    return ChatCompletionResponse(
        public_id, created, model, gen.pick(choices), gen.usage(),
        prompt_logprobs=prompt_logprobs_json(gen.prompt_logprobs.get(0)),
        prompt_token_ids=gen.prompts[0].token_ids if body.return_token_ids else None)


async def _chunks(gen: Generation, body: ChatCompletionRequest, model: str, public_id: str,
                  created: int, updates: Updates, plan: ChatPlan, prompt_text: str | None = None
                  ) -> AsyncIterator[ChatCompletionChunk]:
    opts = body.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = include_usage and bool(opts and opts.continuous_usage_stats)
    as_ids = bool(body.return_tokens_as_token_ids)
    echo = _echo_text(body)
    ids_held: dict[int, list[int]] = {}  # token ids not sent yet (their text is held back)
    shapers: dict[int, ChoiceShaper] = {}
    ids = bool(body.return_token_ids)
    first = [True]  # vLLM: prompt_token_ids and prompt_text on the first chunk only

    def chunk(choice: ChatStreamChoice) -> ChatCompletionChunk:
        out = ChatCompletionChunk(public_id, created, model, [choice],
                                  usage=gen.usage() if continuous else None)
        if first[0]:
            first[0] = False
            out.prompt_token_ids = gen.prompts[0].token_ids if ids else None
            out.prompt_text = prompt_text
        return out

    try:
        async for batch in updates:
            for u in batch:
                shaper = shapers.get(u.index)
                if shaper is None:
                    shaper = shapers[u.index] = ChoiceShaper(plan)
                    yield chunk(ChatStreamChoice(u.index, DeltaMessage("assistant", "")))
                    if echo:
                        yield chunk(ChatStreamChoice(u.index, DeltaMessage(content=echo)))
                lps = chat_logprobs(u.logprobs, body.top_logprobs or 0, as_ids) \
                    if body.logprobs and u.logprobs is not None else None
                delta, finish = shaper.delta(u.text, u.finish_reason)
                pending = ids_held.setdefault(u.index, []) if ids else None
                if pending is not None:
                    pending.extend(u.token_ids)
                if delta is not None and (delta.content or delta.reasoning or delta.tool_calls) \
                        or finish is not None or (lps and lps.content):
                    yield chunk(ChatStreamChoice(u.index, delta or DeltaMessage(), lps, finish,
                                                 u.stop_reason, list(pending)
                                                 if pending is not None else None))
                    if pending is not None:
                        pending.clear()
        if include_usage:
            yield ChatCompletionChunk(public_id, created, model, [], usage=gen.usage())
    except APIError:
        raise
    except Exception:  # a bug: the consumer still sees an APIError it can answer with
        logger.exception("stream %s failed", public_id)
        raise APIError(500, "internal server error") from None
    finally:
        await updates.aclose()  # type: ignore[attr-defined]
