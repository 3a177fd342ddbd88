"""Tool calling and reasoning through a real `fornax serve` and the openai client: a tiny random
llama given Qwen3-style <think>/<tool_call> tokens and a chat template that thinks and takes tools
(--chat-template), served with --enable-auto-tool-choice --tool-call-parser hermes
--reasoning-parser qwen3. Random weights write garbage, so the grammar alone must make every
forced tool call parse and match its tool's schema."""

from __future__ import annotations

import json

import jsonschema
import pytest

from helpers.api_server import sse_events
from helpers.thinker import end_think_id

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 10},
    "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "unit": {"enum": ["C", "F"]}}, "required": ["city", "days"]}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
        "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}



def check_calls(calls, allowed=SCHEMAS) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        jsonschema.validate(json.loads(call.function.arguments), allowed[call.function.name])


def collect(stream) -> tuple[dict[int, dict], list]:
    """Per choice: content, reasoning and calls (id, name, arguments) rebuilt from the deltas."""
    choices: dict[int, dict] = {}
    chunks = list(stream)
    for chunk in chunks:
        for c in chunk.choices:
            got = choices.setdefault(c.index, {"content": "", "reasoning": "", "calls": {},
                                               "finish": None})
            got["content"] += c.delta.content or ""
            got["reasoning"] += (c.delta.model_extra or {}).get("reasoning") or ""
            for t in c.delta.tool_calls or []:
                if t.index not in got["calls"]:
                    assert t.id and t.function.name and t.type == "function"
                    got["calls"][t.index] = [t.id, t.function.name, ""]
                else:
                    assert t.id is None and t.function.name is None
                got["calls"][t.index][2] += t.function.arguments or ""
            got["finish"] = c.finish_reason or got["finish"]
    return choices, chunks


def test_required_tool_calls_always_parse(thinker_client) -> None:
    resp = thinker_client.chat.completions.create(
        model="thinker", messages=ASK, tools=TOOLS, tool_choice="required", n=16,
        temperature=1.0, seed=1, max_tokens=600, parallel_tool_calls=False,
        extra_body=NO_THINKING)
    for choice in resp.choices:
        assert choice.finish_reason == "tool_calls"
        assert len(choice.message.tool_calls) == 1
        check_calls(choice.message.tool_calls)
        assert choice.message.content is None


def test_required_streamed_parallel_calls(thinker_client) -> None:
    # a list of calls has no length limit, so random weights could write calls until max_tokens
    # (then the text is content); with this seed every choice closes its list
    stream = thinker_client.chat.completions.create(
        model="thinker", messages=ASK, tools=TOOLS, tool_choice="required", n=8,
        temperature=1.0, seed=2, max_tokens=600, stream=True, extra_body=NO_THINKING)
    choices, _ = collect(stream)
    assert len(choices) == 8
    for got in choices.values():
        assert got["finish"] == "tool_calls" and got["content"] == ""
        for _, name, arguments in got["calls"].values():
            jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    assert max(len(got["calls"]) for got in choices.values()) >= 2
    names = {c[1] for got in choices.values() for c in got["calls"].values()}
    assert names == {"get_weather", "get_time"}


def test_named_tool_choice_streamed_and_not(thinker_client) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    kwargs = dict(model="thinker", messages=ASK, tools=TOOLS, tool_choice=named, temperature=1.0,
                  seed=3, max_tokens=300, extra_body=NO_THINKING)
    resp = thinker_client.chat.completions.create(n=8, **kwargs)
    for choice in resp.choices:
        assert choice.finish_reason == "stop"  # as vLLM: a named choice is not "tool_calls"
        assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
        check_calls(choice.message.tool_calls)
    choices, chunks = collect(thinker_client.chat.completions.create(n=1, stream=True, **kwargs))
    (_, name, arguments), = choices[0]["calls"].values()
    assert name == "get_weather" and arguments == resp.choices[0].message.tool_calls[
        0].function.arguments  # same seed: the stream adds up to the same call
    fragments = sum(1 for c in chunks for ch in c.choices for _ in ch.delta.tool_calls or [])
    assert fragments > 3  # arguments arrive in pieces


def test_auto_tool_choice_parses_the_models_own_format(thinker_client) -> None:
    # random weights never call a tool on their own; a grammar makes them write hermes calls
    grammar = ('root ::= "I will check.\\n<tool_call>\\n{\\"name\\": \\"get_time\\", '
               '\\"arguments\\": {\\"zone\\": \\"" zone "\\"}}\\n</tool_call>"\n'
               'zone ::= "UTC" | "CET" | "PST"')
    kwargs = dict(model="thinker", messages=ASK, tools=TOOLS, seed=4, max_tokens=200,
                  extra_body={**NO_THINKING, "structured_outputs": {"grammar": grammar}})
    resp = thinker_client.chat.completions.create(**kwargs)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I will check.\n"
    check_calls(choice.message.tool_calls)
    choices, _ = collect(thinker_client.chat.completions.create(stream=True, **kwargs))
    got = choices[0]
    assert got["finish"] == "tool_calls" and got["content"] == "I will check.\n"
    assert [c[1:] for c in got["calls"].values()] == [
        ["get_time", choice.message.tool_calls[0].function.arguments]]
    plain = thinker_client.chat.completions.create(model="thinker", messages=ASK, tools=TOOLS,
                                                   max_tokens=8, extra_body=NO_THINKING, seed=5)
    assert plain.choices[0].message.tool_calls == [] or plain.choices[0].message.tool_calls \
        is None  # no call written: plain content
    assert plain.choices[0].finish_reason in ("stop", "length")


def test_reasoning_then_a_constrained_answer(thinker_client, thinker_http) -> None:
    # the constraint starts after </think>; a logit bias makes random weights end the thinking
    # (ignore_eos: nor does the end-of-sequence token end the thinking; the grammar ends it)
    bias = {str(end_think_id(thinker_http)): 20.0}
    kwargs = dict(model="thinker", messages=ASK, n=6, temperature=1.0, seed=6, max_tokens=400,
                  logit_bias=bias, extra_body={"ignore_eos": True},
                  response_format={"type": "json_schema", "json_schema": {
                      "name": "w", "schema": WEATHER}})
    resp = thinker_client.chat.completions.create(**kwargs)
    reasonings = []
    for choice in resp.choices:
        reasoning = choice.message.model_extra["reasoning"]
        assert isinstance(reasoning, str) and "</think>" not in reasoning
        reasonings.append(reasoning)
        jsonschema.validate(json.loads(choice.message.content), WEATHER)
        assert choice.finish_reason == "stop"
    assert any(reasonings)  # some choices thought for a while before the answer
    choices, _ = collect(thinker_client.chat.completions.create(stream=True, **kwargs))
    for i, choice in enumerate(resp.choices):
        assert choices[i]["reasoning"] == choice.message.model_extra["reasoning"]
        assert choices[i]["content"] == choice.message.content


def test_thinking_disabled_or_unfinished(thinker_client) -> None:
    resp = thinker_client.chat.completions.create(model="thinker", messages=ASK, max_tokens=12,
                                                  seed=7,
                                                  extra_body={**NO_THINKING, "ignore_eos": True})
    assert resp.choices[0].message.model_extra["reasoning"] is None
    assert resp.choices[0].message.content
    resp = thinker_client.chat.completions.create(model="thinker", messages=ASK, max_tokens=12,
                                                  seed=7, extra_body={"ignore_eos": True})
    message = resp.choices[0].message  # the thinking never ended: it is all reasoning
    assert message.model_extra["reasoning"] and message.content is None


def test_tool_history_renders_through_the_template(thinker_http) -> None:
    messages = [*ASK, {"role": "assistant", "content": None, "reasoning_content": "Look it up.",
                       "tool_calls": [{"id": "c1", "type": "function", "function": {
                           "name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "assistant", "content": "It is sunny.", "reasoning": "Easy."}]
    ids = thinker_http.post("/tokenize", json={"messages": messages, "tools": TOOLS,
                                               "add_generation_prompt": False}).json()["tokens"]
    text = thinker_http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}' in text
    assert "<think>Look it up.</think>" in text and "<think>Easy.</think>" in text
    assert "<tool_response>sunny</tool_response>" in text and '"get_time"' in text
    resp = thinker_http.post("/v1/chat/completions", json={
        "messages": messages, "max_tokens": 4, "tools": TOOLS, "tool_choice": "none"})
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["tool_calls"] == []


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
    ({"messages": [{"role": "assistant", "tool_calls": "x"}]}, "messages[0].tool_calls"),
])
def test_bad_tool_requests(thinker_http, body, param) -> None:
    resp = thinker_http.post("/v1/chat/completions",
                             json={"messages": ASK, "max_tokens": 4, **body})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
    events = sse_events(thinker_http.post("/v1/chat/completions", json={
        "messages": ASK, "max_tokens": 4, "stream": True, "tools": TOOLS,
        "tool_choice": "required", **NO_THINKING}).text)
    assert events[-1] == "[DONE]"  # and the server keeps serving
