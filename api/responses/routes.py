"""POST /v1/responses, GET/DELETE /v1/responses/{id}, POST /v1/responses/{id}/cancel: OpenAI's
Responses API over the chat path, with stored and background responses (API workers).

A response is a chat request (instructions + the stored conversation of `previous_response_id` +
the input items) run through the chat path's typed entry `chat.run_chat`; its answer becomes
output items (message, function_call, reasoning). `background` responses run in a task of the worker that
received them; GET shows them queued / in_progress / completed, cancel stops them. With the SQLite
store any worker can cancel: the running worker polls the store and stops. The in-memory store is
per worker (see responses_store).

Response ids are made here, never taken from the client (its `request_id` only becomes the
x-request-id header). With API keys, a stored response belongs to the key that made it: another
key's GET, DELETE, cancel or previous_response_id gets 404, as for an unknown id. Each key may run
at most --responses-max-background background responses per worker (429 beyond).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fornax.api.protocol.openai import ChatCompletionChunk, ChatCompletionRequest
from fornax.api.protocol.responses import ResponsesRequest
from fornax.api.responses.items import chat_body, input_items, input_messages, new_id
from fornax.api.responses.store import RecordTooLarge, ResponseStore, make_store, owner_of
from fornax.api.responses.stream import ResponseRun, sse_event
from fornax.api.routes import chat
from fornax.api.server.errors import APIError
from fornax.api.server.http import Request, Response, StreamingResponse, json_response
from fornax.api.server.settings import ServerSettings

logger = logging.getLogger(__name__)

_POLL_CANCEL_S = 0.5  # how often a background run checks a shared store for a cancel
_END = object()


class ResponsesService:
    """One per API worker: the store and this worker's background runs."""

    def __init__(self, settings: ServerSettings) -> None:
        self.store: ResponseStore = make_store(settings.responses_store,
                                               settings.responses_store_max_count,
                                               settings.responses_store_max_age_s,
                                               settings.responses_store_max_bytes,
                                               settings.responses_store_max_record_bytes)
        self.max_background = settings.responses_max_background
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.task_owner: dict[str, str] = {}  # background response id -> its owner
        self.running: Counter[str] = Counter()  # owner -> background responses running here

    def check_background(self, owner: str) -> None:
        """429 when `owner` already runs --responses-max-background background responses here."""
        if self.running[owner] >= self.max_background:
            raise APIError(429, f"this API key already has {self.max_background} background "
                           "responses running (--responses-max-background); retry later",
                           "background", headers={"retry-after": "1"})

    def release(self, rid: str, owner: str) -> None:
        self.tasks.pop(rid, None)
        self.task_owner.pop(rid, None)
        self.running[owner] -= 1
        if self.running[owner] <= 0:
            del self.running[owner]

    def task_of(self, rid: str, owner: str) -> asyncio.Task[None] | None:
        """This worker's background run of `rid`, when `owner` started it."""
        return self.tasks.get(rid) if self.task_owner.get(rid) == owner else None

    async def close(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.store.close()


def service_of(req: Request) -> ResponsesService:
    state = req.state
    service = state.responses
    if service is None:
        service = state.responses = ResponsesService(state.settings)
    return service


def owner_of_request(req: Request) -> str:
    """The owner tag of this request's records: a hash of its API key ('' without API keys).
    The app has already checked the key, read the same way (Request.presented_key)."""
    if not req.state.settings.api_keys:
        return ""
    return owner_of(req.presented_key or "")


def _not_found(rid: str) -> APIError:
    return APIError(404, f"Response with id '{rid}' not found.", "response_id")


async def create_response(req: Request) -> Response:
    body = await req.json(ResponsesRequest)  # 400 naming the field on bad input
    raw = await req.json_value()  # the typed decode skips unknown fields; this one checks them
    model = req.state.resolve_model(body.model)
    if body.background and not body.store:
        raise APIError(400, "background responses need store=true", "background")
    service = service_of(req)
    owner = owner_of_request(req)
    if body.background:
        service.check_background(owner)  # early: before any work
    history: list[dict[str, Any]] = []
    if body.previous_response_id:  # another key's response is not found
        prev = await service.store.get(body.previous_response_id, owner)
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
    rid = new_id("resp")  # never the client's request_id: ids are not chosen by clients
    tokenizer = req.state.tokenizer
    run = ResponseRun(service.store, rid, body, model, messages,
                      lambda text: len(tokenizer.encode(text, add_special_tokens=False)))
    run.input_items = input_items(body.input)
    run.owner = owner
    if body.store:
        try:  # the record without its output must fit the per-record cap
            service.store.encode(run.record())
        except RecordTooLarge as exc:
            raise APIError(400, f"{exc}; send store=false to be answered without storing",
                           "store") from None
    streamed = body.stream or body.background
    chat_fields = chat_body(raw, body, messages, streamed)
    if body.truncation == "auto":  # keep the newest tokens that leave room for the output
        room = body.max_output_tokens or 1
        chat_fields["truncate_prompt_tokens"] = max(1, req.state.max_model_len - room)
    inner = _chat_request(chat_fields)
    headers = {"x-request-id": body.request_id or rid}
    if body.background:
        return await _start_background(req, service, run, inner, headers)
    try:  # a refusal is raised here, answered with its own status before any streamed byte
        answer, _ = await chat.run_chat(req, inner)
        if body.stream:
            chunks = chat.as_stream(answer)
        else:
            whole = await chat.as_response(answer)
    except APIError as exc:
        raise _in_responses_terms(exc) from None
    if body.stream:

        async def opened() -> AsyncIterator[ChatCompletionChunk]:
            return chunks

        return StreamingResponse(_sse(run.events(opened)), headers=headers)
    run.from_answer(whole)
    await run.save()  # may find the answer too large to store: store=false then
    return json_response(run.snapshot(), headers=headers)


_CHAT_PARAMS = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
                "response_format": "text.format", "messages": "input",
                "reasoning_effort": "reasoning.effort"}


def _chat_request(body: dict[str, Any]) -> ChatCompletionRequest:
    """The chat request as the typed struct; a field it refuses is named in this API's terms."""
    try:
        return chat.chat_request(body)
    except APIError as exc:
        raise _in_responses_terms(exc) from None


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
                            inner: ChatCompletionRequest, headers: dict[str, str]) -> Response:
    """Store the response as queued and run it in a task that outlives this request; a streamed
    one also sends its events to this client while it stays connected."""
    service.check_background(run.owner)  # again, with no await before the slot is taken
    service.running[run.owner] += 1
    service.task_owner[run.rid] = run.owner
    try:
        await run.save()
    except BaseException:
        service.release(run.rid, run.owner)
        raise
    listener: asyncio.Queue[Any] | None = asyncio.Queue() if run.body.stream else None

    async def open_chunks() -> AsyncIterator[ChatCompletionChunk]:
        answer, _ = await chat.run_chat(req, inner, detached=True)
        return chat.as_stream(answer)

    task = asyncio.create_task(_run_background(service, run, open_chunks, listener))
    service.tasks[run.rid] = task
    task.add_done_callback(lambda _: service.release(run.rid, run.owner))
    end_lease = req.state.models.detach(req)  # many models: held until the run ends
    task.add_done_callback(lambda _: end_lease())
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
                          open_chunks: Callable[[], Awaitable[AsyncIterator[ChatCompletionChunk]]],
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
                held = await service.store.get(run.rid, run.owner)
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
    record = await service_of(req).store.get(rid, owner_of_request(req))
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
    owner = owner_of_request(req)
    task = service.task_of(rid, owner)
    if task is not None:  # running here: stop it and wait for its cancelled record
        task.cancel()
        await asyncio.wait([task], timeout=10)
    record = await service.store.get(rid, owner)
    if record is None:
        raise _not_found(rid)
    if not record.response.get("background"):
        raise APIError(400, "Cannot cancel a synchronous response.", "response_id")
    if task is None:  # elsewhere (another worker polls the shared store) or finished already
        record = await service.store.cancel(rid, owner) or record
    return json_response(record.response)


async def delete_response(req: Request) -> Response:
    rid, action = _split(req)
    if action:
        raise APIError(404, f"no route {req.path}")
    service = service_of(req)
    owner = owner_of_request(req)
    task = service.task_of(rid, owner)
    if task is not None:
        task.cancel()
    if not await service.store.delete(rid, owner):
        raise _not_found(rid)
    return json_response({"id": rid, "object": "response", "deleted": True})
