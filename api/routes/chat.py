"""POST /v1/chat/completions: chat template -> engine -> JSON or SSE (API workers)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fornax.api.generation.beam import beam_search, check_beam_request
from fornax.api.routes.chat_features import ChatPlan, plan_chat, resolve_thinking
from fornax.api.routes.chat_output import ChoiceShaper
from fornax.api.server.errors import APIError
from fornax.api.generation.generate import (
    ChoiceUpdate,
    Generation,
    PromptInput,
    begin_generation,
    chain,
    new_request_id,
    request_sampling_params,
    start_updates,
    usage_of,
)
from fornax.api.server.http import SSE_DONE, Request, Response, StreamingResponse, json_response, sse
from fornax.api.generation.logprobs import chat_logprobs, prompt_logprobs_json
from fornax.api.server.offload import prepare
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
from fornax.api.generation.sampling import (
    check_prompt,
    check_unsupported,
    resolve_max_tokens,
    truncate_prompt,
)
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


async def chat_completions(req: Request) -> Response:
    state = req.state
    body = await req.json(ChatCompletionRequest)
    model = state.resolve_model(body.model)
    check_unsupported(body, structured=True)
    plan = plan_chat(state.chat_features, body)
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
    if body.top_logprobs is not None and not \
            0 <= body.top_logprobs <= state.engine_info.max_logprobs:
        raise APIError(400, f"top_logprobs must be in [0, {state.engine_info.max_logprobs}] "
                       "(--max-logprobs)", "top_logprobs")
    text, ids = await prepare(
        req, render_prompt, state, body.messages,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message, tools=body.tools,
        documents=body.documents, chat_template=body.chat_template,
        template_kwargs=body.chat_template_kwargs, add_special_tokens=body.add_special_tokens)
    ids = truncate_prompt(ids, body.truncate_prompt_tokens, state.max_model_len)
    check_prompt(ids, state.max_model_len, state.engine_info.vocab_size, "messages")
    resolve_thinking(plan, state, body, text)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(requested, state.sampling_defaults.get("max_tokens"),
                                    len(ids), state.max_model_len, param)
    if body.use_beam_search:
        return json_response(await _beam(req, body, model, ids, max_tokens))
    top_n = body.top_logprobs or 0
    params = request_sampling_params(state, body, max_tokens=max_tokens,
                                     logprobs=top_n if body.logprobs else None,
                                     extra=plan.sampling_extra())
    gen, public_id, created = begin_generation(req, body, "chatcmpl", [PromptInput(ids, text)],
                                               params)
    if body.stream:
        first, rest = await start_updates(gen)
        return StreamingResponse(_stream(gen, body, model, public_id, created, first, rest,
                                         plan), headers={"x-request-id": public_id, **plan.headers})
    return json_response(await _complete(gen, body, model, public_id, created, plan),
                         headers={"x-request-id": public_id, **plan.headers})


async def _beam(req: Request, body: ChatCompletionRequest, model: str, ids: list[int],
                max_tokens: int) -> ChatCompletionResponse:
    """use_beam_search: the n best beams (not streamed)."""
    check_beam_request(req.state, body, max_tokens)
    if body.logprobs:
        raise APIError(400, "beam search returns no logprobs", "use_beam_search")
    req.watch_disconnect()
    beams = await beam_search(req.state, ids, body, max_tokens)
    choices = [ChatChoice(i, ChatMessage("assistant", b.text), None, b.finish_reason)
               for i, b in enumerate(beams)]
    completion = sum(len(b.token_ids) for b in beams)
    public_id, _ = new_request_id("chatcmpl", body.request_id or req.request_id)
    return ChatCompletionResponse(public_id, int(time.time()), model, choices,
                                  UsageInfo(len(ids), len(ids) + completion, completion))


async def _complete(gen: Generation, body: ChatCompletionRequest, model: str, public_id: str,
                    created: int, plan: ChatPlan) -> ChatCompletionResponse:
    k = gen.num_candidates
    echo = _echo_text(body)
    texts = [""] * k
    finish: list[str | None] = [None] * k
    stop: list[int | str | None] = [None] * k
    entries: list[list[Any]] = [[] for _ in range(k)]
    async for batch in gen.updates():
        for u in batch:
            texts[u.index] += u.text
            finish[u.index], stop[u.index] = u.finish_reason, u.stop_reason
            if u.logprobs:
                entries[u.index].extend(u.logprobs)
    as_ids = bool(body.return_tokens_as_token_ids)
    shaped = [ChoiceShaper(plan).message(texts[i], finish[i], echo) for i in range(k)]
    choices = gen.pick([ChatChoice(
        i, shaped[i][0],
        chat_logprobs(entries[i], body.top_logprobs or 0, as_ids) if body.logprobs else None,
        shaped[i][1], stop[i]) for i in range(k)])
    for index, choice in enumerate(choices):
        choice.index = index
    return ChatCompletionResponse(public_id, created, model, choices, usage_of(gen),
                                  prompt_logprobs=prompt_logprobs_json(gen.prompt_logprobs.get(0)))


async def _stream(gen: Generation, body: ChatCompletionRequest, model: str, public_id: str,
                  created: int, first: list[ChoiceUpdate],
                  rest: AsyncIterator[list[ChoiceUpdate]], plan: ChatPlan) -> AsyncIterator[bytes]:
    opts = body.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = include_usage and bool(opts and opts.continuous_usage_stats)
    as_ids = bool(body.return_tokens_as_token_ids)
    echo = _echo_text(body)
    started: set[int] = set()
    shapers: dict[int, ChoiceShaper] = {}

    def chunk(choice: ChatStreamChoice) -> bytes:
        return sse(ChatCompletionChunk(public_id, created, model, [choice],
                                       usage=usage_of(gen) if continuous else None))

    try:
        async for batch in chain(first, rest):
            for u in batch:
                if u.index not in started:
                    started.add(u.index)
                    shapers[u.index] = ChoiceShaper(plan)
                    yield chunk(ChatStreamChoice(u.index, DeltaMessage("assistant", "")))
                    if echo:
                        yield chunk(ChatStreamChoice(u.index, DeltaMessage(content=echo)))
                lps = chat_logprobs(u.logprobs, body.top_logprobs or 0, as_ids) \
                    if body.logprobs and u.logprobs is not None else None
                delta, finish = shapers[u.index].delta(u.text, u.finish_reason)
                if delta is not None and (delta.content or delta.reasoning or delta.tool_calls) \
                        or finish is not None or (lps and lps.content):
                    yield chunk(ChatStreamChoice(u.index, delta or DeltaMessage(), lps, finish,
                                                 u.stop_reason))
        if include_usage:
            yield sse(ChatCompletionChunk(public_id, created, model, [], usage=usage_of(gen)))
    except APIError as exc:  # mid-stream failure: an error event, then [DONE]
        yield sse(exc.to_response())
    except Exception:  # a bug: still end the stream the way clients expect
        logger.exception("stream %s failed", public_id)
        yield sse(APIError(500, "internal server error").to_response())
    finally:
        await rest.aclose()
    yield SSE_DONE
