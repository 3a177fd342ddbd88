"""POST /v1/chat/completions/batch: several conversations in one request (API workers).

vLLM's shape: a chat body whose `messages` is a list of conversations; the answer is one
chat.completion whose choice i (n = 1) answers conversation i, with the usage summed. Every
other field applies to each conversation (structured output included). `stream` and `tools` are
refused, as vLLM does. The conversations run concurrently through the chat path's typed entry
(`chat.run_chat`), so they share the engine's batches; if one fails, the others are cancelled
and its error is the answer.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fornax.api.protocol.openai import ChatChoice, ChatCompletionResponse
from fornax.api.routes import chat
from fornax.api.routes.pooling_common import check_route_runner
from fornax.api.routes.subrequest import subrequest
from fornax.api.server.errors import APIError
from fornax.api.server.http import Request, Response, json_response
from fornax.runtime.limits import MAX_CONVERSATIONS


def _conversations(body: Any) -> list[list[dict[str, Any]]]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    convs = body.get("messages")
    if not isinstance(convs, list) or not convs or \
            not all(isinstance(c, list) and c for c in convs):
        raise APIError(400, "messages must be a non-empty list of conversations, each a "
                       "non-empty list of messages", "messages")
    if len(convs) > MAX_CONVERSATIONS:
        raise APIError(400, f"at most {MAX_CONVERSATIONS} conversations per request", "messages")
    if body.get("stream"):
        raise APIError(400, "the batch endpoint does not stream; use /v1/chat/completions",
                       "stream")
    if body.get("tools"):
        raise APIError(400, "tools are not supported by the batch endpoint", "tools")
    n = body.get("n")
    if n not in (None, 1):
        raise APIError(400, "the batch endpoint answers each conversation once (n = 1)", "n")
    return convs


async def _answer(req: Request, body: dict[str, Any]) -> ChatCompletionResponse:
    answer, _ = await chat.run_chat(req, chat.chat_request(body), detached=True)
    return await chat.as_response(answer)


async def _run_all(req: Request, bodies: list[dict[str, Any]]) -> list[ChatCompletionResponse]:
    tasks = [asyncio.create_task(_answer(req, b)) for b in bodies]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for i, task in enumerate(tasks):
            if task.done() and not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                if isinstance(exc, APIError):  # name the conversation: messages[i][j].role
                    exc.message = f"conversation {i}: {exc.message}"
                    if exc.param is None or exc.param.startswith("messages"):
                        exc.param = f"messages[{i}]{(exc.param or '')[len('messages'):]}"
                raise exc  # type: ignore[misc]
        return [t.result() for t in tasks]
    finally:  # an error or a client that went away: nothing keeps running
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def chat_batch(req: Request) -> Response:
    body = await req.json_value()  # size and depth limits, as every JSON route
    convs = _conversations(body)
    check_route_runner(subrequest(req, "/v1/chat/completions", {}))  # pooling model: 501
    model = req.state.resolve_model(body.get("model"))
    req.watch_disconnect()  # cancels this task, which cancels every conversation
    answers = await _run_all(req, [{**body, "messages": conv} for conv in convs])
    choices: list[ChatChoice] = []
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for i, answer in enumerate(answers):
        choice = answer.choices[0]
        choice.index = i
        choices.append(choice)
        usage["prompt_tokens"] += answer.usage.prompt_tokens
        usage["completion_tokens"] += answer.usage.completion_tokens
        usage["total_tokens"] += answer.usage.total_tokens
    public_id = f"chatcmpl-batch-{uuid.uuid4().hex}"
    return json_response({"id": public_id, "object": "chat.completion",
                          "created": int(time.time()), "model": model, "choices": choices,
                          "usage": usage}, headers={"x-request-id": public_id})
