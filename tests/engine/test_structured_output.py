"""Structured output through xgrammar: every constraint kind is enforced or refused, never ignored."""

from __future__ import annotations

import json
import re

import pytest

from fornax.runtime import SamplingParams
from fornax.runtime.errors import RequestError
from fornax.runtime.sampling.params import StructuredOutputsParams as Constraint

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"]}
PROMPTS = ["Describe a person", "JSON please:", "x", "Tell me about cats and dogs"]


def run(llm, constraint, prompts=PROMPTS, **kw):
    params = SamplingParams(temperature=kw.pop("temperature", 0.0), max_tokens=kw.pop(
        "max_tokens", 80), structured_outputs=constraint, **kw)
    return [c for o in llm.generate(prompts, params) for c in o.outputs]


def test_json_schema_output_parses_and_validates(make_llm) -> None:
    llm = make_llm("qwen2")
    for out in run(llm, Constraint(json=SCHEMA), max_tokens=240):  # room for whitespace runs
        assert out.finish_reason == "stop", out.text
        value = json.loads(out.text)  # strict: no raw control characters inside strings
        assert set(value) == {"name", "age"}  # strict: no extra properties
        assert isinstance(value["name"], str) and len(value["name"]) <= 12
        assert isinstance(value["age"], int)


def test_regex_choice_and_grammar(make_llm) -> None:
    llm = make_llm()
    for out in run(llm, Constraint(regex=r"[a-c]{2}-[0-9]{3}")):
        assert re.fullmatch(r"[a-c]{2}-[0-9]{3}", out.text) and out.finish_reason == "stop"
    choices = ["apple pie", "banana", "cherry"]
    for out in run(llm, Constraint(choice=choices), temperature=1.5, seed=4):
        assert out.text in choices
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    for out in run(llm, Constraint(grammar=grammar)):
        assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", out.text), out.text


def test_json_object_with_n_seeds_stop_strings_and_prefix_cache(make_llm) -> None:
    llm = make_llm(enable_prefix_caching=True)
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=60,
                            structured_outputs=Constraint(json_object=True))
    first = llm.generate("same prefix for every request " * 4, params)[0]
    again = llm.generate("same prefix for every request " * 4, params)[0]
    assert again.num_cached_tokens > 0
    for a, b in zip(first.outputs, again.outputs):
        assert a.token_ids == b.token_ids  # seeded and constrained: reproducible
        if a.finish_reason == "stop":
            assert isinstance(json.loads(a.text, strict=False), dict)
    cut = run(llm, Constraint(regex=r"abcabcabc"), stop=["ca"])
    assert all(o.text == "ab" and o.stop_reason == "ca" for o in cut)


@pytest.mark.parametrize("constraint, field", [
    (dict(json='{"type": "object", "properties": '), "structured_outputs.json"),
    (dict(regex="([a-"), "structured_outputs.regex"),
    (dict(grammar="root ::= missing_rule"), "structured_outputs.grammar"),
])
def test_uncompilable_constraints_are_refused_with_the_compiler_message(make_llm, constraint,
                                                                        field) -> None:
    llm = make_llm()
    with pytest.raises(RequestError) as err:
        llm.generate("x", SamplingParams(structured_outputs=Constraint(**constraint)))
    assert err.value.param == field
    assert llm.generate("still fine", SamplingParams(max_tokens=3))[0].outputs[0].token_ids


def test_constraint_kinds_are_exclusive() -> None:
    # checked once at the edge (validate), not on construction or msgspec decoding
    with pytest.raises(RequestError, match="exactly one"):
        Constraint(regex="a", choice=["b"]).validate()
    with pytest.raises(RequestError, match="exactly one"):
        Constraint().validate()
    with pytest.raises(RequestError, match="choice"):
        Constraint(choice=[]).validate()
    with pytest.raises(RequestError, match="exactly one"):
        SamplingParams(structured_outputs=Constraint()).validate()


def test_constraint_starts_after_the_thinking_marker(make_llm) -> None:
    llm = make_llm()
    free = llm.generate("think", SamplingParams(temperature=0, max_tokens=6,
                                                ignore_eos=True))[0].outputs[0].token_ids
    marker = free[2:4]  # the model emits these unconstrained; the regex applies afterwards
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs_after=marker,
                            structured_outputs=Constraint(regex="[0-9]{4}"))
    out = llm.generate("think", params)[0].outputs[0]
    assert out.token_ids[:4] == free[:4]
    tail = llm.tokenizer.decode(out.token_ids[4:])
    assert re.fullmatch("[0-9]{4}", tail) and out.finish_reason == "stop"
