"""Tool parsers on outputs in each model family's format: whole, streamed in pieces of every size
(the deltas add up to the whole), several calls, malformed -> plain content; the plugin registry."""

from __future__ import annotations

import json

import pytest

from fornax.api.tools.base import ToolParse
from fornax.api.tools.forced import NamedToolParser, RequiredToolParser
from fornax.api.tools.registry import (
    ToolParserError,
    get_tool_parser,
    load_tool_parser_plugin,
    tool_parser_names,
)
from fornax.api.tools.stream import ToolStream

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                         "metric": {"type": "boolean"},
                                         "hours": {"type": "array", "items": {"type": "integer"}}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string"}}}}},
]
PARIS = {"city": "Paris", "days": 3}
LYON = {"city": "Lyon"}

# What models of each family write (as in their chat templates' documentation and vLLM's tests).
RECORDED = {
    "hermes": (
        'I will look that up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
        '"Paris", "days": 3}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Lyon"}}\n</tool_call>',
        "I will look that up.\n", [("get_weather", PARIS), ("get_weather", LYON)]),
    "llama3_json": (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}; '
        '{"name": "get_weather", "parameters": {"city": "Lyon"}}',
        "", [("get_weather", PARIS), ("get_weather", LYON)]),
    "mistral": (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, '
        '{"name": "get_weather", "arguments": {"city": "Lyon"}}]</s>',
        "", [("get_weather", PARIS), ("get_weather", LYON)]),
    "pythonic": (
        '[get_weather(city="Paris", days=3), get_weather(city=\'Lyon\')]',
        "", [("get_weather", PARIS), ("get_weather", LYON)]),
    "qwen3_xml": (
        "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n"
        "<function=get_weather>\n<parameter=city>\nLyon\n</parameter>\n</function>\n"
        "</tool_call>",
        "Checking.\n", [("get_weather", PARIS), ("get_weather", LYON)]),
}

MALFORMED = {
    "hermes": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
               '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
               "<tool_call>not json</tool_call>"],
    "llama3_json": ['{"name": "get_weather", "parameters": {"city": "Paris"', '{"city": "Paris"}',
                    '{"name": "get_weather", "parameters": [1, 2]}'],
    "mistral": ['[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}',
                "[TOOL_CALLS] get_weather"],
    "pythonic": ["[get_weather(city=Paris)]", "[get_weather(city='Paris')", "[get_weather('x')]",
                 "[get_weather(city=__import__('os'))]"],
    "qwen3_xml": ["<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n",
                  "<tool_call>\n<parameter=city>x</parameter></tool_call>"],
}


def stream(parser_cls, text: str, step: int, tools=TOOLS) -> tuple[str, list[tuple[str, str]],
                                                                   list[str]]:
    """Feed `text` in pieces of `step` characters; returns (content, [(name, arguments)], ids)."""
    st = ToolStream(parser_cls(tools), True, parser_cls.id_style)
    content = ""
    calls: dict[int, list[str]] = {}
    for end in [*range(step, len(text), step), None]:
        piece, deltas = st.update(text if end is None else text[:end], end is None)
        content += piece
        for d in deltas:
            if d.index not in calls:
                assert d.id and d.type == "function" and d.function.name, d  # first delta
                calls[d.index] = [d.id, d.function.name, ""]
            else:
                assert d.id is None and d.function.name is None
            calls[d.index][2] += d.function.arguments or ""
    ordered = [calls[i] for i in sorted(calls)]
    return content, [(c[1], c[2]) for c in ordered], [c[0] for c in ordered]


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_recorded_outputs_whole_and_streamed(name: str) -> None:
    text, content, expected = RECORDED[name]
    cls = get_tool_parser(name)
    whole = cls(TOOLS).extract(text)
    assert whole.content == content
    assert [(c.name, json.loads(c.arguments)) for c in whole.calls] == expected
    for step in (1, 2, 3, 5, 8, 13, len(text)):
        got_content, calls, ids = stream(cls, text, step)
        assert got_content == content, step
        assert calls == [(c.name, c.arguments) for c in whole.calls], step
        assert len(set(ids)) == len(ids)
        if name == "mistral":
            assert all(len(i) == 9 and i.isalnum() for i in ids)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_calls_are_plain_content(name: str) -> None:
    cls = get_tool_parser(name)
    for text in MALFORMED[name]:
        expect = text.removesuffix("</s>")
        assert cls(TOOLS).extract(text) == ToolParse(expect, []), text
        content, calls, _ = stream(cls, text, 4)
        assert content == expect  # nothing is lost when the call turns out malformed


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_text_without_calls_streams_as_is(name: str) -> None:
    cls = get_tool_parser(name)
    for text in ("The weather in Paris is sunny.", "a < b and [x] are fine", ""):
        assert cls(TOOLS).extract(text) == ToolParse(text, [])
        content, calls, _ = stream(cls, text, 3)
        assert (content, calls) == (text, [])


def test_family_specific_shapes() -> None:
    hermes = get_tool_parser("hermes")(TOOLS)
    # arguments given as a JSON string, name after arguments, no closing tag at the very end
    got = hermes.extract('<tool_call>{"arguments": "{\\"zone\\": \\"UTC\\"}", "name": '
                         '"get_time"}')
    assert [(c.name, json.loads(c.arguments)) for c in got.calls] == [("get_time", {"zone": "UTC"})]
    mistral = get_tool_parser("mistral")(TOOLS)  # v11 tokenizer format, and magistral's call ids
    got = mistral.extract('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time'
                          '[CALL_ID]a1b2c3d4e[ARGS]{}')
    assert [(c.name, json.loads(c.arguments)) for c in got.calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    changes: dict = {}
    mistral.adjust_params(changes)
    assert changes == {"skip_special_tokens": False}
    py = get_tool_parser("pythonic")(TOOLS)
    got = py.extract('<|python_start|>[get_weather(city="Nice", hours=[1, -2], metric=false), '
                     "get_time()]<|python_end|>")
    assert [json.loads(c.arguments) for c in got.calls] == [
        {"city": "Nice", "hours": [1, -2], "metric": False}, {}]
    qwen = get_tool_parser("qwen3_xml")(TOOLS)  # values typed by the schema; a missing close tag
    got = qwen.extract("<function=get_weather>\n<parameter=city>\n42\n<parameter=days>\n7\n"
                       "</parameter>\n<parameter=hours>\n[1, 2]\n</parameter>\n"
                       "<parameter=metric>\nFalse\n</parameter>\n</function>")
    assert json.loads(got.calls[0].arguments) == {"city": "42", "days": 7, "hours": [1, 2],
                                                  "metric": False}
    llama = get_tool_parser("llama3_json")(TOOLS)
    assert llama.extract('  {"name": "get_time", "arguments": {}}').calls[0].name == "get_time"


def test_streamed_arguments_arrive_in_fragments() -> None:
    text = RECORDED["hermes"][0]
    st = ToolStream(get_tool_parser("hermes")(TOOLS), True, "openai")
    fragments = []
    for end in range(1, len(text) + 1):
        for d in st.update(text[:end], end == len(text))[1]:
            if d.index == 0 and d.id is None:
                fragments.append(d.function.arguments)
    assert len(fragments) > 5 and "".join(fragments).endswith("3}")


def test_forced_parsers_and_parallel_off() -> None:
    text = ('[{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}, '
            '{"name": "get_time", "parameters": {}}]')
    req = RequiredToolParser(TOOLS)
    assert [(c.name, json.loads(c.arguments)) for c in req.extract(text).calls] == [
        ("get_weather", PARIS), ("get_time", {})]
    content, calls, _ = stream(RequiredToolParser, text, 2)
    assert content == "" and [c[0] for c in calls] == ["get_weather", "get_time"]
    assert req.extract(text[:-1]) == ToolParse(text[:-1], [])  # cut short: content
    named = NamedToolParser(TOOLS, "get_time")
    assert named.extract('{"zone": "CET"}').calls[0].arguments == '{"zone": "CET"}'
    assert named.extract('{"zone": ').calls == []
    st = ToolStream(RequiredToolParser(TOOLS), False, "openai")
    _, deltas = st.update(text, True)
    assert [d.function.name for d in deltas] == ["get_weather"]


def test_registry_and_plugins(tmp_path) -> None:
    assert {"hermes", "llama3_json", "mistral", "pythonic", "qwen3_xml"} <= set(tool_parser_names())
    with pytest.raises(ToolParserError, match="unknown tool-call parser"):
        get_tool_parser("nope")
    plugin = tmp_path / "my_parser.py"
    plugin.write_text(
        "from fornax.api.tools.base import ToolCallPart, ToolParse, ToolParser\n"
        "from fornax.api.tools.registry import register_tool_parser\n\n"
        "@register_tool_parser('call_colon')\n"
        "class CallColon(ToolParser):\n"
        "    def parse(self, text, final):\n"
        "        if not text.startswith('CALL:'):\n"
        "            return ToolParse(text)\n"
        "        name, _, args = text[5:].partition(' ')\n"
        "        return ToolParse('', [ToolCallPart(name, args, final)])\n")
    load_tool_parser_plugin(str(plugin))
    load_tool_parser_plugin(str(plugin))  # once per process
    got = get_tool_parser("call_colon")(TOOLS).extract('CALL:get_time {"zone": "UTC"}')
    assert [(c.name, c.arguments) for c in got.calls] == [("get_time", '{"zone": "UTC"}')]
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ToolParserError, match="boom"):
        load_tool_parser_plugin(str(broken))
    with pytest.raises(ToolParserError, match="no such file"):
        load_tool_parser_plugin(str(tmp_path / "missing.py"))
