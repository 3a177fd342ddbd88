"""Reasoning split, request constraints, tool_choice planning, chat history and the per-choice
shaper, without a server (they are what the chat route runs)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from fornax.api.generation.structured import request_constraint
from fornax.api.protocol.openai import ChatCompletionRequest
from fornax.api.reasoning import get_reasoning_parser, thinking_state
from fornax.api.routes.chat_features import ChatFeatures, ChatPlan, plan_chat
from fornax.api.routes.chat_output import ChoiceShaper
from fornax.api.server.errors import APIError
from fornax.api.tools.choice import plan_tools
from fornax.api.tools.messages import prepare_messages
from fornax.api.tools.registry import get_tool_parser

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}},
    {"type": "function", "function": {"name": "g"}}]
MSG = [{"role": "user", "content": "hi"}]


def split_streamed(parser, text: str, step: int) -> tuple[str, str]:
    reasoning = content = ""
    for end in [*range(step, len(text), step), len(text)]:
        r, c = parser.split(text[:end], end == len(text))
        assert (r or "").startswith(reasoning) and c.startswith(content), (text[:end], r, c)
        reasoning, content = r or "", c
    return reasoning, content


@pytest.mark.parametrize("name, state, text, expected", [
    ("deepseek_r1", "started", "Let me think.\n</think>\n\nThe answer is 4.",
     ("Let me think.\n", "\n\nThe answer is 4.")),
    ("deepseek_r1", "none", "<think>hmm</think>4", ("hmm", "4")),
    ("deepseek_r1", "started", "still thinking when cut", ("still thinking when cut", "")),
    ("qwen3", "none", "<think>\nplan\n</think>\n\nDone.", ("\nplan\n", "\n\nDone.")),
    ("qwen3", "none", "No thinking here.", (None, "No thinking here.")),
    ("qwen3", "started", "plan</think>ok", ("plan", "ok")),
    ("qwen3", "ended", "<think>x</think>y", (None, "<think>x</think>y")),
])
def test_reasoning_split_whole_and_streamed(name, state, text, expected) -> None:
    parser = get_reasoning_parser(name)(state)
    assert parser.split(text, True) == expected
    for step in (1, 2, 3, 7):
        assert split_streamed(get_reasoning_parser(name)(state), text, step) == (
            expected[0] or "", expected[1])


def test_thinking_state_of_the_generation_prompt() -> None:
    assert thinking_state("<|im_start|>assistant\n<think>\n\n</think>\n\n") == "ended"
    assert thinking_state("<|Assistant|><think>\n") == "started"
    assert thinking_state("<|im_start|>assistant\n") == "none"


def _req(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=MSG, **fields)


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize("fields, expected", [
    ({}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}},
     {"json_object": True, "source": "response_format"}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA,
                                                                 "strict": False}}},
     {"json": SCHEMA, "source": "response_format"}),
    ({"structured_outputs": {"regex": "[0-9]+", "disable_any_whitespace": True}},
     {"regex": "[0-9]+", "disable_any_whitespace": True}),
    ({"structured_outputs": {"choice": ["a", "b"], "disable_fallback": True}},
     {"choice": ["a", "b"]}),
    ({"guided_json": SCHEMA, "guided_decoding_backend": "outlines"},
     {"json": SCHEMA, "source": "guided_json"}),
    ({"guided_regex": "a+"}, {"regex": "a+", "source": "guided_regex"}),
    ({"guided_choice": ["x"]}, {"choice": ["x"], "source": "guided_choice"}),
    ({"guided_grammar": 'root ::= "a"'}, {"grammar": 'root ::= "a"', "source": "guided_grammar"}),
    ({"response_format": {"type": "structural_tag", "structures": [
        {"begin": "<f>", "schema": SCHEMA, "end": "</f>"}], "triggers": ["<f"]}},
     {"structural_tag": {"type": "structural_tag", "format": {
         "type": "triggered_tags", "triggers": ["<f"], "tags": [
             {"type": "tag", "begin": "<f>", "end": "</f>",
              "content": {"type": "json_schema", "json_schema": SCHEMA}}]}},
      "source": "response_format"}),
])
def test_every_constraint_source(fields, expected) -> None:
    assert request_constraint(_req(**fields)) == expected


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}},
     "structured_outputs.whitespace_pattern"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"json": 3}}, "structured_outputs.json"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"guided_choice": ["a", 1]}, "guided_choice"),
    ({"guided_whitespace_pattern": " *", "guided_regex": "a"}, "guided_whitespace_pattern"),
])
def test_bad_or_double_constraints_are_400s(fields, param) -> None:
    with pytest.raises(APIError) as err:
        request_constraint(_req(**fields))
    assert err.value.status == 400 and err.value.param == param


def test_tool_choice_plans() -> None:
    hermes = get_tool_parser("hermes")
    assert plan_tools(None, None, None, parser=None, auto_enabled=False).mode == "none"
    assert plan_tools(TOOLS, "none", None, parser=None, auto_enabled=False).mode == "none"
    with pytest.raises(APIError, match="enable-auto-tool-choice"):
        plan_tools(TOOLS, None, None, parser=hermes, auto_enabled=False)  # default is auto
    assert plan_tools(TOOLS, "auto", None, parser=hermes, auto_enabled=True).mode == "auto"
    req = plan_tools(TOOLS, "required", False, parser=None, auto_enabled=False)
    schema = req.constraint["json"]
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    assert [v["properties"]["name"]["enum"] for v in schema["items"]["anyOf"]] == [["f"], ["g"]]
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "f"}}, None,
                       parser=get_tool_parser("mistral"), auto_enabled=False)
    assert named.constraint == {"json": TOOLS[0]["function"]["parameters"],
                                "disable_any_whitespace": True, "source": "tools"}
    assert named.id_style == "mistral" and not named.finish_as_tool_calls
    for tools, choice in ((TOOLS, {"type": "function", "function": {"name": "nope"}}),
                          (None, "required"), (TOOLS, "sometimes"),
                          ([{"type": "function", "function": {}}], "required")):
        with pytest.raises(APIError) as err:
            plan_tools(tools, choice, None, parser=None, auto_enabled=False)
        assert err.value.status == 400 and err.value.param.startswith(("tool", "tools"))


def test_plan_chat_refuses_two_constraints_and_beam_search() -> None:
    features = ChatFeatures()
    with pytest.raises(APIError, match="cannot be combined"):
        plan_chat(features, _req(tools=TOOLS, tool_choice="required",
                                 response_format={"type": "json_object"}))
    with pytest.raises(APIError) as err:
        plan_chat(features, _req(guided_regex="a", use_beam_search=True))
    assert err.value.param == "use_beam_search"
    plan = plan_chat(features, _req(guided_regex="a"))
    assert plan.sampling_extra() == {"structured_outputs": {"regex": "a",
                                                            "source": "guided_regex"}}
    assert plan.headers == {"x-fornax-structured-output-backend": "xgrammar"}
    plan.constraint_after = [7, 8]
    assert plan.sampling_extra()["structured_outputs_after"] == [7, 8]


def test_history_tool_calls_and_reasoning_names() -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "reasoning": "think", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "ok", "reasoning_content": "old name"},
    ]
    out = prepare_messages(messages)
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert out[1]["reasoning_content"] == "think" and out[3]["reasoning"] == "old name"
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"x": 1}'  # not mutated
    with pytest.raises(APIError) as err:
        prepare_messages([{"role": "assistant", "tool_calls": [{"function": {}}]}])
    assert err.value.param == "messages[0].tool_calls[0]"


def _plan(reasoning: str | None, state: str, tools=None, choice=None) -> ChatPlan:
    tool_plan = plan_tools(tools, choice, None, parser=get_tool_parser("hermes"),
                           auto_enabled=True)
    return ChatPlan(tool_plan, None, get_reasoning_parser(reasoning) if reasoning else None,
                    state)


@pytest.mark.parametrize("step", [1, 4, 9])
def test_shaper_stream_adds_up_to_the_whole_message(step) -> None:
    text = ('Weather needed.</think>\n\n<tool_call>\n{"name": "f", "arguments": {"x": 5}}\n'
            '</tool_call>')
    plan = _plan("deepseek_r1", "started", TOOLS, "auto")
    message, finish = ChoiceShaper(plan).message(text, "stop")
    assert finish == "tool_calls" and message.reasoning == "Weather needed."
    assert message.content is None  # only whitespace besides the call
    assert [json.loads(c["function"]["arguments"]) for c in message.tool_calls] == [{"x": 5}]
    shaper = ChoiceShaper(plan)
    reasoning, content, args, finishes = "", "", "", []
    pieces = [text[i:i + step] for i in range(0, len(text), step)]
    for k, piece in enumerate(pieces):
        delta, finish = shaper.delta(piece, "stop" if k == len(pieces) - 1 else None)
        finishes.append(finish)
        if delta is None:
            continue
        reasoning += delta.reasoning or ""
        content += delta.content or ""
        args += "".join(t.function.arguments or "" for t in delta.tool_calls or [])
    assert reasoning == message.reasoning and content.strip() == ""
    assert json.loads(args) == {"x": 5} and finishes[-1] == "tool_calls"


def test_shaper_without_features_is_a_pass_through() -> None:
    shaper = ChoiceShaper(_plan(None, "none"))
    delta, finish = shaper.delta("abc", None)
    assert delta.content == "abc" and finish is None
    message, finish = ChoiceShaper(_plan(None, "none")).message("", "length", echo="")
    assert message.content == "" and message.reasoning is None and finish == "length"


def test_chat_features_from_settings() -> None:
    features = ChatFeatures.from_settings(SimpleNamespace(
        tool_call_parser="pythonic", enable_auto_tool_choice=True, reasoning_parser="qwen3",
        tool_parser_plugin=None))
    assert features.tool_parser.name == "pythonic" and features.auto_tool_choice
    assert features.reasoning_parser.name == "qwen3"
