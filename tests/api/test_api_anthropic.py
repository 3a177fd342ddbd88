"""Anthropic Messages API on a real `fornax serve` through the official `anthropic` client:
answers equal the chat API's on the same conversation, streaming events, stop sequences, tools,
count_tokens, x-api-key auth and Anthropic's error shape."""

from __future__ import annotations

import json
import re

import anthropic
import httpx
import openai
import pytest

from helpers.api_server import API_KEYS
from helpers.thinker import end_think_id

GREEDY = {"temperature": 0}
SYSTEM = "You are terse."
USER = "Tell me a story about the sea."
TOOLS = [{"name": "get_weather", "description": "The weather in a city",
          "input_schema": {"type": "object", "required": ["city"], "properties": {
              "city": {"type": "string", "enum": ["Paris", "Rome"]}}}}]
# forced calls: random weights write long whitespace runs inside the grammar, so leave room
FORCED = {"max_tokens": 450, "extra_body": {"seed": 0, "temperature": 1.0}}


@pytest.fixture(scope="module")
def server(main_server):
    return main_server


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=API_KEYS[0], max_retries=0,
                               timeout=60)


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEYS[0], max_retries=0,
                         timeout=60)


def _chat(oai: openai.OpenAI, messages: list, max_tokens: int = 24, **kw):
    return oai.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                       temperature=0, **kw)


def test_create_equals_chat_on_the_same_conversation(client, oai):
    msg = client.messages.create(model="tiny", max_tokens=24, system=SYSTEM,
                                 messages=[{"role": "user", "content": USER}], extra_body=GREEDY)
    ref = _chat(oai, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}])
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "tiny"
    assert msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == ref.choices[0].message.content
    expected = {"length": "max_tokens", "stop": "end_turn"}[ref.choices[0].finish_reason]
    assert msg.stop_reason == expected and msg.stop_sequence is None
    usage = msg.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == ref.usage.prompt_tokens
    assert usage.output_tokens == ref.usage.completion_tokens
    counted = client.messages.count_tokens(model="tiny", system=SYSTEM,
                                           messages=[{"role": "user", "content": USER}])
    assert counted.input_tokens == ref.usage.prompt_tokens
    # system as text blocks, user content as text blocks: the same prompt
    blocks = client.messages.create(
        model="tiny", max_tokens=24, system=[{"type": "text", "text": SYSTEM}],
        messages=[{"role": "user", "content": [{"type": "text", "text": USER}]}],
        extra_body=GREEDY)
    assert blocks.content[0].text == msg.content[0].text


def test_stream_event_sequence_equals_non_stream(client):
    kwargs = dict(model="tiny", max_tokens=20, messages=[{"role": "user", "content": USER}],
                  extra_body=GREEDY)
    full = client.messages.create(**kwargs)
    events = list(client.messages.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1] == "content_block_start" and kinds[-3] == "content_block_stop"
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert events[0].message.usage.input_tokens + \
        events[0].message.usage.cache_read_input_tokens > 0
    assert events[1].content_block.type == "text" and events[1].index == 0
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == full.content[0].text
    delta = events[-2]
    assert delta.delta.stop_reason == full.stop_reason
    assert delta.usage.output_tokens == full.usage.output_tokens
    with client.messages.stream(**kwargs) as stream:  # the SDK's accumulating helper
        final = stream.get_final_message()
    assert final.content[0].text == full.content[0].text


def test_stop_sequences(client):
    kwargs = dict(model="tiny", max_tokens=24, messages=[{"role": "user", "content": USER}],
                  extra_body=GREEDY)
    text = client.messages.create(**kwargs).content[0].text
    match = re.search(r"[A-Za-z]{2,}", text[1:])
    assert match, text
    stop = match.group(0)
    cut = client.messages.create(stop_sequences=[stop, "zzzz-never"], **kwargs)
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]


def test_tool_use_and_tool_result_history_maps_to_chat_tool_messages(client, oai):
    history = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 C"},
            {"type": "text", "text": "Thanks!"}]},
    ]
    msg = client.messages.create(model="tiny", max_tokens=16, tools=TOOLS, messages=history,
                                 tool_choice={"type": "none"}, extra_body=GREEDY)
    ref = _chat(oai, [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny, 21 C"},
        {"role": "user", "content": "Thanks!"}],
        max_tokens=16, tool_choice="none", tools=[{"type": "function", "function": {
            "name": "get_weather", "description": "The weather in a city",
            "parameters": TOOLS[0]["input_schema"]}}])
    assert msg.content[0].text == ref.choices[0].message.content
    counted = client.messages.count_tokens(model="tiny", tools=TOOLS, messages=history)
    assert counted.input_tokens == ref.usage.prompt_tokens


def _forced(client: anthropic.Anthropic, **kw):
    """A forced tool call (fornax's chat path has them: a refusal fails the test)."""
    return client.messages.create(
        model="tiny", tools=TOOLS, messages=[{"role": "user", "content": "Weather?"}],
        **FORCED, **kw)


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
def test_forced_tool_use_streamed_and_not(client, choice):
    msg = _forced(client, tool_choice=choice)
    assert msg.stop_reason == "tool_use"
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and uses[0].id
    assert uses[0].input["city"] in ("Paris", "Rome")
    events = list(_forced(client, tool_choice=choice, stream=True))
    starts = [e for e in events if e.type == "content_block_start"]
    assert starts[-1].content_block.type == "tool_use"
    assert starts[-1].content_block.name == "get_weather"
    partial = "".join(e.delta.partial_json for e in events
                      if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
    assert json.loads(partial) == uses[0].input  # the same seed: the same call
    assert events[-2].delta.stop_reason == "tool_use"


def test_reasoning_becomes_a_thinking_block(thinker_server):
    thinker = thinker_server
    client = anthropic.Anthropic(base_url=thinker.url, api_key="none", max_retries=0)
    oai = openai.OpenAI(base_url=thinker.url + "/v1", api_key="none", max_retries=0)
    with httpx.Client(base_url=thinker.url, timeout=60) as http:
        extra = {"seed": 0, "ignore_eos": True, "temperature": 1.0,
                 "logit_bias": {str(end_think_id(http)): 20.0}}
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    ref = oai.chat.completions.create(model="thinker", messages=ask, max_tokens=40,
                                      extra_body=extra).choices[0].message
    msg = client.messages.create(model="thinker", max_tokens=40, messages=ask, extra_body=extra)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == ref.model_extra["reasoning"]
    assert msg.content[1].text == ref.content
    events = list(client.messages.create(model="thinker", max_tokens=40, messages=ask,
                                         stream=True, extra_body=extra))
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert "".join(d.thinking for d in deltas if d.type == "thinking_delta") == \
        msg.content[0].thinking
    assert [e.content_block.type for e in events if e.type == "content_block_start"] == \
        ["thinking", "text"]
    plain = client.messages.create(model="thinker", max_tokens=8, messages=ask,
                                   thinking={"type": "disabled"}, extra_body=extra)
    assert [b.type for b in plain.content] == ["text"]


def test_errors_use_anthropic_shape(client, server):
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="tiny", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}}]}])
    assert bad.value.body["type"] == "error"
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    assert "image" in bad.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="claude-nope", max_tokens=8,
                               messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["error"]["type"] == "not_found_error"
    wrong = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as denied:
        wrong.messages.create(model="tiny", max_tokens=8,
                              messages=[{"role": "user", "content": "hi"}])
    assert denied.value.body["error"]["type"] == "authentication_error"
    no_max = httpx.post(server.url + "/v1/messages", headers={"x-api-key": API_KEYS[1]},
                        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert no_max.status_code == 400 and "max_tokens" in no_max.json()["error"]["message"]
    bearer = httpx.post(server.url + "/v1/messages",  # Bearer keys work here too
                        headers={"Authorization": f"Bearer {API_KEYS[1]}"},
                        json={"model": "tiny", "max_tokens": 2,
                              "messages": [{"role": "user", "content": "hi"}]})
    assert bearer.status_code == 200 and bearer.json()["type"] == "message"
