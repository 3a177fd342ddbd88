"""POST /v1/responses, GET/DELETE /v1/responses/{id}, POST /v1/responses/{id}/cancel: OpenAI's
Responses API over the chat path, with stored and background responses (API workers).

A response is a chat request (instructions + the stored conversation of `previous_response_id` +
the input items) run in-process through `chat.chat_completions`; its answer becomes output items
(message, function_call, reasoning). `background` responses run in a task of the worker that
received them; GET shows them queued / in_progress / completed, cancel stops them. With the SQLite
store any worker can cancel: the running worker polls the store and stops. The in-memory store is
per worker (see responses_store).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from fornax.api import chat
from fornax.api.errors import APIError
from fornax.api.http import Request, Response, StreamingResponse, json_response
from fornax.api.protocol.responses import ResponsesRequest
from fornax.api.responses_items import chat_body, input_items, input_messages, new_id
from fornax.api.responses_store import ResponseStore, make_store
from fornax.api.responses_stream import ResponseRun, sse_event
from fornax.api.settings import ServerSettings
from fornax.api.subrequest import call_json, open_stream, subrequest

logger = logging.getLogger(__name__)

_POLL_CANCEL_S = 0.5  # how often a background run checks a shared store for a cancel
_END = object()


class ResponsesService:
    """One per API worker: the store and this worker's background runs."""

    def __init__(self, settings: ServerSettings) -> None:
        self.store: ResponseStore = make_store(settings.responses_store,
                                               settings.responses_store_max_count,
                                               settings.responses_store_max_age_s)
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def close(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.store.close()


def service_of(req: Request) -> ResponsesService:
    state = req.state
    if getattr(state, "responses", None) is None:
        state.responses = ResponsesService(state.settings)
    return state.responses


def _not_found(rid: str) -> APIError:
    return APIError(404, f"Response with id '{rid}' not found.", "response_id")


async def create_response(req: Request) -> Response:
    body = await req.json(ResponsesRequest)  # 400 naming the field on bad input
    raw = msgspec.json.decode(await req.body())
    model = req.state.resolve_model(body.model)
    if body.background and not body.store:
        raise APIError(400, "background responses need store=true", "background")
    service = service_of(req)
    history: list[dict[str, Any]] = []
    if body.previous_response_id:
        prev = await service.store.get(body.previous_response_id)
        if prev is None:
            raise APIError(404, f"Previous response with id '{body.previous_response_id}' not "
                           "found.", "previous_response_id")
        if prev.status not in ("completed", "incomplete"):
            raise APIError(400, f"the previous response is {prev.status}; only a completed one "
                           "can be continued", "previous_response_id")
        history = prev.messages
    messages = [*history, *input_messages(body.input)]
    if not messages:
        raise APIError(400, "input is required", "input")
    rid = f"resp_{body.request_id}" if body.request_id else new_id("resp")
    tokenizer = req.state.tokenizer
    run = ResponseRun(service.store, rid, body, model, messages,
                      lambda text: len(tokenizer.encode(text, add_special_tokens=False)))
    run.input_items = input_items(body.input)
    streamed = body.stream or body.background
    inner = chat_body(raw, body, messages, streamed)
    headers = {"x-request-id": rid}
    if body.background:
        return await _start_background(req, service, run, inner, headers)
    try:
        if body.stream:  # opened here: a refusal is still answered with its own status
            chunks = await open_stream(chat.chat_completions,
                                       subrequest(req, "/v1/chat/completions", inner))
        else:
            answer = await call_json(chat.chat_completions,
                                     subrequest(req, "/v1/chat/completions", inner))
    except APIError as exc:
        raise _in_responses_terms(exc) from None
    if body.stream:

        async def opened() -> AsyncIterator[dict[str, Any]]:
            return chunks

        return StreamingResponse(_sse(run.events(opened)), headers=headers)
    obj = run.from_answer(answer)
    await run.save()
    return json_response(obj, headers=headers)


_CHAT_PARAMS = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
                "response_format": "text.format", "messages": "input",
                "reasoning_effort": "reasoning.effort"}


def _in_responses_terms(exc: APIError) -> APIError:
    """A chat refusal naming this request's fields (max_tokens -> max_output_tokens, ...)."""
    param = exc.param
    if param:
        head = re.match(r"[A-Za-z_]*", param).group(0)  # type: ignore[union-attr]
        if head == "messages":
            exc.param = "input"  # the chat conversation also holds history and instructions
        elif head in _CHAT_PARAMS:
            exc.param = _CHAT_PARAMS[head] + param[len(head):]
        elif head == "tools":
            exc.param = param.replace(".function.", ".")
    return exc


async def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield sse_event(event)
    finally:
        await events.aclose()  # type: ignore[attr-defined]


# ---- background ------------------------------------------------------------------------------


async def _start_background(req: Request, service: ResponsesService, run: ResponseRun,
                            inner: dict[str, Any], headers: dict[str, str]) -> Response:
    """Store the response as queued and run it in a task that outlives this request; a streamed
    one also sends its events to this client while it stays connected."""
    await run.save()
    listener: asyncio.Queue[Any] | None = asyncio.Queue() if run.body.stream else None

    async def open_chunks() -> AsyncIterator[dict[str, Any]]:
        return await open_stream(chat.chat_completions,
                                 subrequest(req, "/v1/chat/completions", inner, detached=True))

    task = asyncio.create_task(_run_background(service, run, open_chunks, listener))
    service.tasks[run.rid] = task
    task.add_done_callback(lambda _: service.tasks.pop(run.rid, None))
    if listener is None:
        return json_response(run.snapshot(), headers=headers)
    return StreamingResponse(_follow(listener), headers=headers)


async def _follow(listener: asyncio.Queue[Any]) -> AsyncIterator[bytes]:
    while True:
        event = await listener.get()
        if event is _END:
            return
        yield sse_event(event)


async def _run_background(service: ResponsesService, run: ResponseRun,
                          open_chunks: Callable[[], Awaitable[AsyncIterator[dict[str, Any]]]],
                          listener: asyncio.Queue[Any] | None) -> None:
    events = run.events(open_chunks)
    next_poll = time.monotonic() + _POLL_CANCEL_S
    try:
        run.status = "in_progress"
        if not await run.save():  # cancelled while queued
            raise asyncio.CancelledError
        async for event in events:
            if listener is not None:
                listener.put_nowait(event)
            if service.store.shared and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + _POLL_CANCEL_S
                held = await service.store.get(run.rid)
                if held is not None and held.status == "cancelled":
                    raise asyncio.CancelledError  # cancelled by another API worker
        if run.status == "cancelled":  # cancelled elsewhere just before the end
            await run.save()
    except asyncio.CancelledError:
        run.cancel()
        with contextlib.suppress(Exception):
            await asyncio.shield(run.save())
    except Exception:  # a bug: the response fails, the worker lives on
        logger.exception("background response %s failed", run.rid)
        run.fail(APIError(500, "internal server error"))
        with contextlib.suppress(Exception):
            await run.save()
    finally:
        await events.aclose()  # type: ignore[attr-defined]
        if listener is not None:
            listener.put_nowait(_END)


# ---- retrieve, cancel, delete ----------------------------------------------------------------


def _split(req: Request) -> tuple[str, str]:
    """'/v1/responses/{id}[/cancel]' -> (id, action)."""
    rest = req.path_params.get("rest", "")
    rid, _, action = rest.partition("/")
    if not rid:
        raise APIError(404, f"no route {req.path}")
    return rid, action


async def get_response(req: Request) -> Response:
    rid, action = _split(req)
    if action not in ("", "input_items"):
        raise APIError(404, f"no route {req.path}")
    if req.query.get("stream", ["false"])[-1].lower() == "true":
        raise APIError(400, "resuming a response stream is not supported; GET it without "
                       "stream", "stream")
    record = await service_of(req).store.get(rid)
    if record is None:
        raise _not_found(rid)
    if action == "input_items":
        return json_response(_page(req, record.input_items))
    return json_response(record.response)


def _page(req: Request, items: list[dict[str, Any]]) -> dict[str, Any]:
    """A page of input items: `order` (desc by default), `limit` (20), `after` (an item id)."""
    query = {k: v[-1] for k, v in req.query.items()}
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise APIError(400, "order must be asc or desc", "order")
    limit = query.get("limit", "20")
    if not limit.isdigit() or not 1 <= int(limit) <= 100:
        raise APIError(400, "limit must be an integer in [1, 100]", "limit")
    ordered = items if order == "asc" else items[::-1]
    after = query.get("after")
    if after is not None:
        ids = [item.get("id") for item in ordered]
        ordered = ordered[ids.index(after) + 1:] if after in ids else []
    page = ordered[:int(limit)]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(ordered) > len(page)}


async def cancel_response(req: Request) -> Response:
    rid, action = _split(req)
    if action != "cancel":
        raise APIError(404, f"no route {req.path}")
    service = service_of(req)
    task = service.tasks.get(rid)
    if task is not None:  # running here: stop it and wait for its cancelled record
        task.cancel()
        await asyncio.wait([task], timeout=10)
    record = await service.store.get(rid)
    if record is None:
        raise _not_found(rid)
    if not record.response.get("background"):
        raise APIError(400, "Cannot cancel a synchronous response.", "response_id")
    if task is None:  # elsewhere (another worker polls the shared store) or finished already
        record = await service.store.cancel(rid) or record
    return json_response(record.response)


async def delete_response(req: Request) -> Response:
    rid, action = _split(req)
    if action:
        raise APIError(404, f"no route {req.path}")
    service = service_of(req)
    task = service.tasks.get(rid)
    if task is not None:
        task.cancel()
    if not await service.store.delete(rid):
        raise _not_found(rid)
    return json_response({"id": rid, "object": "response", "deleted": True})
