"""OpenAI Responses API on a real `fornax serve` (two API workers sharing a SQLite store) through
the official `openai` client: answers equal chat's, the SSE event sequence, input items,
previous_response_id, store, background + cancel, a restart that keeps stored responses; and
the stores' bounds and cancel rules without a server."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from fornax.api.responses.store import (
    MemoryResponseStore,
    SQLiteResponseStore,
    StoredResponse,
)
from helpers.thinker import end_think_id

GREEDY = {"temperature": 0}
TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string", "enum": ["Paris", "Rome"]}}}}
# forced calls: random weights write long whitespace runs inside the grammar, so leave room
FORCED = {"max_output_tokens": 450, "temperature": 1.0, "extra_body": {"seed": 0}}


@pytest.fixture(scope="module")
def server(surfaces_server):
    return surfaces_server  # two API workers sharing a SQLite store


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def _chat_text(client: openai.OpenAI, messages: list, max_tokens: int, **kw) -> str:
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                         temperature=0, **kw)
    return out.choices[0].message.content or ""


def test_create_equals_chat_and_stream_equals_create(client):
    kwargs = dict(model="tiny", input="Tell me about the sea.", instructions="Be brief.",
                  max_output_tokens=16, **GREEDY)
    r = client.responses.create(**kwargs)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tiny"
    assert r.output_text == _chat_text(client, [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about the sea."}], 16)
    assert r.status in ("completed", "incomplete")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens <= 16 and r.usage.total_tokens == \
        r.usage.input_tokens + r.usage.output_tokens
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert events[-1].response.status == r.status
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert "".join(e.delta for e in deltas) == r.output_text
    assert {e.item_id for e in deltas} == {events[2].item.id}
    final = events[-1].response
    assert final.output_text == r.output_text and final.usage.output_tokens == \
        r.usage.output_tokens
    assert client.responses.retrieve(final.id).output_text == r.output_text  # stored
    with client.responses.stream(**kwargs) as stream:  # the SDK's accumulating helper
        assert stream.get_final_response().output_text == r.output_text


def test_input_items_and_previous_response_id(client):
    first = client.responses.create(model="tiny", input=[
        {"role": "developer", "content": "Answer briefly."},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "What is the weather in Paris?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"}],
        tools=[TOOL], tool_choice="none", max_output_tokens=8, **GREEDY)
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}]
    chat_tools = [{"type": "function", "function": {k: v for k, v in TOOL.items()
                                                    if k != "type"}}]
    assert first.output_text == _chat_text(client, conversation, 8, tools=chat_tools,
                                           tool_choice="none")
    items = client.responses.input_items.list(first.id, order="asc").data
    assert [i.type for i in items] == ["message", "message", "function_call",
                                       "function_call_output"]
    assert items[1].content[0].text == "What is the weather in Paris?" and items[2].id
    newest = client.responses.input_items.list(first.id, limit=1)
    assert [i.type for i in newest.data] == ["function_call_output"] and newest.has_more
    follow = client.responses.create(model="tiny", input="And tomorrow?", max_output_tokens=8,
                                     previous_response_id=first.id, **GREEDY)
    assert follow.previous_response_id == first.id
    assert follow.output_text == _chat_text(client, [
        *conversation, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And tomorrow?"}], 8)


def test_store_false_and_missing_ids(client, server):
    r = client.responses.create(model="tiny", input="hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="tiny", input="hi", previous_response_id="resp_nope")
    assert missing.value.body["param"] == "previous_response_id"
    for body, param in (
            ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
             "input[0].content[0]"),
            ({"input": "hi", "background": True, "store": False}, "background"),
            ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0]"),
            ({"input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id"),
            ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format"),
            ({"input": "hi", "text": {"format": 5}}, "text.format"),
            ({"input": "hi", "reasoning": {"effort": "huge"}}, "reasoning.effort"),
            ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),  # chat's refusal
            ({}, "input")):
        bad = httpx.post(server.url + "/v1/responses", json={"model": "tiny", **body})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
    delete = client.responses.create(model="tiny", input="hi", max_output_tokens=2)
    assert httpx.delete(f"{server.url}/v1/responses/{delete.id}").json()["deleted"] is True
    assert httpx.get(f"{server.url}/v1/responses/{delete.id}").status_code == 404


def _wait(client: openai.OpenAI, rid: str, statuses: set[str], timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = client.responses.retrieve(rid)  # either worker: the store is shared
        if got.status in statuses:
            return got
        time.sleep(0.05)
    raise AssertionError(f"{rid} never reached {statuses}")


def test_background_completes_and_cancel_stops_it(client):
    queued = client.responses.create(model="tiny", input="Hello", background=True,
                                     max_output_tokens=8, **GREEDY)
    assert queued.status in ("queued", "in_progress") and queued.background
    done = _wait(client, queued.id, {"completed", "incomplete"})
    assert done.output_text == client.responses.create(model="tiny", input="Hello",
                                                       max_output_tokens=8, **GREEDY).output_text
    long = client.responses.create(model="tiny", input="Hello", background=True,
                                   max_output_tokens=450, extra_body={"ignore_eos": True})
    _wait(client, long.id, {"in_progress"})
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    time.sleep(0.5)
    final = client.responses.retrieve(long.id)
    assert final.status == "cancelled" and (final.usage is None or
                                            final.usage.output_tokens < 450)
    assert client.responses.cancel(done.id).status == done.status  # finished: unchanged
    synchronous = client.responses.create(model="tiny", input="x", max_output_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(synchronous.id)


def test_background_stream_sends_the_events(client):
    events = list(client.responses.create(model="tiny", input="Hello", background=True,
                                          stream=True, max_output_tokens=6, **GREEDY))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert _wait(client, events[-1].response.id, {"completed", "incomplete"}).output_text == \
        events[-1].response.output_text
    stream = client.responses.create(model="tiny", input="Hello", background=True, stream=True,
                                     max_output_tokens=40, extra_body={"ignore_eos": True})
    rid = next(iter(stream)).response.id
    stream.close()  # the client goes away; a background response runs on
    assert _wait(client, rid, {"incomplete"}).usage.output_tokens == 40


def _forced(client: openai.OpenAI, **kw):
    """A forced function call (fornax's chat path has them: a refusal fails the test)."""
    return client.responses.create(model="tiny", input="Weather?", tools=[TOOL], **FORCED, **kw)


def test_function_tool_forced_then_its_output_continues(client):
    for choice in ("required", {"type": "function", "name": "get_weather"}):
        r = _forced(client, tool_choice=choice)
        calls = [o for o in r.output if o.type == "function_call"]
        assert calls and calls[0].name == "get_weather" and calls[0].call_id
        assert json.loads(calls[0].arguments)["city"] in ("Paris", "Rome")
        events = list(_forced(client, tool_choice=choice, stream=True))
        args = "".join(e.delta for e in events
                       if e.type == "response.function_call_arguments.delta")
        done = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert done and done[0].arguments == args and done[0].name == "get_weather"
        assert json.loads(args) == json.loads(calls[0].arguments)  # the same seed
    follow = client.responses.create(model="tiny", previous_response_id=r.id, input=[
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny"}],
        max_output_tokens=4, **GREEDY)
    assert follow.status in ("completed", "incomplete")


def test_text_format_json_schema_constrains_the_output(client):
    schema = {"type": "object", "required": ["answer"], "additionalProperties": False,
              "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}}}
    r = client.responses.create(model="tiny", input="Is the sea big?", **FORCED, text={
        "format": {"type": "json_schema", "name": "verdict", "schema": schema, "strict": True}})
    assert r.status == "completed" and r.text.format.type == "json_schema"
    assert json.loads(r.output_text)["answer"] in ("yes", "no")


def test_reasoning_becomes_a_reasoning_item_before_the_message(thinker_server):
    thinker = thinker_server
    oai = openai.OpenAI(base_url=thinker.url + "/v1", api_key="none", max_retries=0, timeout=60)
    with httpx.Client(base_url=thinker.url, timeout=60) as http:
        extra = {"seed": 0, "ignore_eos": True, "logit_bias": {str(end_think_id(http)): 20.0}}
    ask = "What is the weather in Paris?"
    ref = oai.chat.completions.create(model="thinker", messages=[{"role": "user", "content": ask}],
                                      max_tokens=40, temperature=1.0, extra_body=extra)
    reasoning = ref.choices[0].message.model_extra["reasoning"]
    assert reasoning and ref.choices[0].message.content  # this seed thinks, then answers
    kwargs = dict(model="thinker", input=ask, max_output_tokens=40, temperature=1.0,
                  extra_body=extra)
    r = oai.responses.create(**kwargs)
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == reasoning and r.output[0].id.startswith("rs_")
    assert r.output_text == ref.choices[0].message.content
    assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
    events = list(oai.responses.create(stream=True, **kwargs))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == \
        reasoning
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == \
        r.output_text
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["reasoning", "message"]


def test_stored_responses_survive_a_restart(server, client):
    r = client.responses.create(model="tiny", input="Remember me.", max_output_tokens=6,
                                **GREEDY)
    before = server.proc.pid
    server.restart()  # a new process on the same SQLite file (and port)
    assert server.proc.pid != before
    kept = client.responses.retrieve(r.id)
    assert kept.output_text == r.output_text and kept.status == r.status
    follow = client.responses.create(model="tiny", previous_response_id=r.id, input="Again?",
                                     max_output_tokens=2)
    assert follow.usage.input_tokens > r.usage.input_tokens + r.usage.output_tokens


# ---- stores without a server ------------------------------------------------------------------


def _record(status: str, created: float | None = None) -> StoredResponse:
    return StoredResponse({"id": "x", "status": status, "background": True}, [],
                          time.time() if created is None else created)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_store_bounds_and_cancel_rules(kind, tmp_path):
    async def run() -> None:
        store = MemoryResponseStore(3, 60.0) if kind == "memory" else \
            SQLiteResponseStore(str(tmp_path / "s.db"), 3, 60.0)
        if kind == "sqlite":
            store._last_prune = -1e9  # prune on every write in this test
        await store.put("old", _record("completed", time.time() - 120))
        assert await store.get("old") is None  # older than max_age
        for i in range(5):
            if kind == "sqlite":
                store._last_prune = -1e9
            await store.put(f"r{i}", _record("completed", time.time() + i * 1e-3))
        assert [await store.get(f"r{i}") is not None for i in range(5)] == \
            [False, False, True, True, True]
        # newer than r2..r4 (stamped up to 4 ms ahead): pruning to 3 must keep it on any clock
        await store.put("bg", _record("in_progress", time.time() + 1.0))
        assert (await store.cancel("bg")).status == "cancelled"
        assert await store.put("bg", _record("completed")) is False  # cancel wins
        assert (await store.get("bg")).status == "cancelled"
        assert (await store.cancel("r4")).status == "completed"  # finished: unchanged
        assert await store.delete("r4") and not await store.delete("r4")
        store.close()

    asyncio.run(run())
