"""Structured outputs through a real `fornax serve` (tiny random llama): 50 generations of every
constraint kind are all valid because of the constraint alone; n > 1, streaming, stop strings and
prefix caching; uncompilable or conflicting constraints are 400s and the server keeps serving."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

from helpers.api_server import auth, sse_events

HEADER = "x-fornax-structured-output-backend"
N = 50
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
    "active": {"type": "boolean"}},
    "required": ["name", "age", "role"]}
CHAT = [{"role": "user", "content": "Describe a person as JSON."}]
# Arithmetic over small numbers with nesting: checked by the recursive parser below.
GRAMMAR = ('root ::= expr\nexpr ::= term (("+" | "*") term){0,3}\n'
           'term ::= num | "(" expr ")"\nnum ::= [1-9] [0-9]?')


@pytest.fixture(scope="module")
def http(main_server):
    with httpx.Client(base_url=main_server.url, headers=auth(), timeout=120) as client:
        yield client


def chat(http, **body) -> httpx.Response:
    body.setdefault("messages", CHAT)
    body.setdefault("max_tokens", 460)  # room for the whitespace runs random weights write
    return http.post("/v1/chat/completions", json=body)


def texts_of(resp: httpx.Response) -> list[tuple[str, str]]:
    """(text, finish_reason) of every choice, from a JSON or an SSE response."""
    assert resp.status_code == 200, resp.text
    assert resp.headers[HEADER] == "xgrammar"
    if resp.headers["content-type"].startswith("text/event-stream"):
        events = sse_events(resp.text)
        assert events[-1] == "[DONE]"
        parts: dict[int, list[str]] = {}
        finish: dict[int, str] = {}
        for event in events[:-1]:
            for c in event["choices"]:
                piece = c["delta"].get("content") if "delta" in c else c["text"]
                parts.setdefault(c["index"], []).append(piece or "")
                if c["finish_reason"]:
                    finish[c["index"]] = c["finish_reason"]
        return [("".join(parts[i]), finish[i]) for i in sorted(parts)]
    return [(c["message"]["content"] if "message" in c else c["text"], c["finish_reason"])
            for c in resp.json()["choices"]]


def parse_arithmetic(text: str) -> None:
    """Raise ValueError unless `text` is in GRAMMAR's language."""
    pos = 0

    def term() -> None:
        nonlocal pos
        if text.startswith("(", pos):
            pos += 1
            expr()
            if not text.startswith(")", pos):
                raise ValueError(f"expected ) at {pos} in {text!r}")
            pos += 1
            return
        m = re.compile(r"[1-9][0-9]?").match(text, pos)
        if not m:
            raise ValueError(f"expected a number at {pos} in {text!r}")
        pos = m.end()

    def expr() -> None:
        nonlocal pos
        term()
        for _ in range(3):
            if pos < len(text) and text[pos] in "+*":
                pos += 1
                term()
    expr()
    if pos != len(text):
        raise ValueError(f"trailing text in {text!r}")


def all_valid(outputs: list[tuple[str, str]], check) -> None:
    assert len(outputs) == N
    for text, finish in outputs:
        assert finish == "stop", (text, finish)
        check(text)


def test_json_schema_chat(http) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True}}
    outputs = texts_of(chat(http, n=N, temperature=1.0, seed=1, response_format=fmt))
    all_valid(outputs, lambda t: jsonschema.validate(json.loads(t), PERSON))  # strict json.loads
    assert len({t for t, _ in outputs}) > N // 2  # the constraint, not one memorised answer


def test_guided_json_streamed_completions_two_prompts(http) -> None:
    resp = http.post("/v1/completions", json={
        "prompt": ["Person:", "Another person:"], "n": N // 2, "max_tokens": 480, "seed": 2,
        "temperature": 1.0, "stream": True, "guided_json": PERSON,
        "guided_decoding_backend": "outlines"})  # accepted; xgrammar says the header
    all_valid(texts_of(resp), lambda t: jsonschema.validate(json.loads(t), PERSON))


def test_regex_and_choice_completions(http) -> None:
    pattern = r"[A-Z][a-z]{2,6}-[0-9]{3}(\.[0-9]{1,2})?"
    resp = http.post("/v1/completions", json={
        "prompt": "Code:", "n": N, "max_tokens": 40, "seed": 3, "temperature": 1.0,
        "structured_outputs": {"regex": pattern}})
    all_valid(texts_of(resp), lambda t: re.fullmatch(pattern, t) or pytest.fail(t))
    choices = ["yes", "no", "not sure", "🙂 maybe"]
    resp = http.post("/v1/completions", json={
        "prompt": "Answer:", "n": N, "max_tokens": 20, "seed": 4, "temperature": 1.5,
        "stream": True, "guided_choice": choices})
    outputs = texts_of(resp)
    all_valid(outputs, lambda t: t in choices or pytest.fail(t))
    assert len({t for t, _ in outputs}) >= 3


def test_grammar_chat_streamed_and_not(http) -> None:
    body = dict(n=N // 2, temperature=1.0, max_tokens=200,
                structured_outputs={"grammar": GRAMMAR})
    outputs = texts_of(chat(http, seed=5, **body)) + texts_of(chat(http, seed=6, stream=True,
                                                                    **body))
    all_valid(outputs, parse_arithmetic)


def test_json_object_and_no_whitespace(http) -> None:
    outputs = texts_of(chat(http, n=N, temperature=0.8, seed=7,
                            response_format={"type": "json_object"}))
    stopped = [t for t, f in outputs if f == "stop"]
    # an unbounded grammar: random weights write strings that never close, so some run out of
    # tokens (the bounded schemas above always finish)
    assert len(stopped) >= 0.8 * N
    for text in stopped:
        json.loads(text)
    outputs = texts_of(chat(http, n=N, temperature=1.0, seed=8, structured_outputs={
        "json": PERSON, "disable_any_whitespace": True}))

    def compact(text: str) -> None:
        value = json.loads(text)
        jsonschema.validate(value, PERSON)
        assert text == json.dumps(value, ensure_ascii=False)  # xgrammar's ", " and ": " only
    all_valid(outputs, compact)


def test_structural_tag(http) -> None:
    fmt = {"type": "structural_tag", "format": {
        "type": "tag", "begin": "<answer>", "end": "</answer>",
        "content": {"type": "json_schema", "json_schema": PERSON}}}
    for text, finish in texts_of(chat(http, n=8, seed=9, response_format=fmt)):
        assert finish == "stop" and text.startswith("<answer>") and text.endswith("</answer>")
        jsonschema.validate(json.loads(text[len("<answer>"):-len("</answer>")]), PERSON)


def test_stop_strings_and_prefix_cache(http) -> None:
    resp = http.post("/v1/completions", json={
        "prompt": "abc", "n": 3, "max_tokens": 20, "guided_regex": "abcabcabc", "stop": ["ca"]})
    assert [c["text"] for c in resp.json()["choices"]] == ["ab"] * 3
    assert {c["stop_reason"] for c in resp.json()["choices"]} == {"ca"}
    long_prompt = [{"role": "user", "content": "The same long question, again and again. " * 12}]
    body = dict(messages=long_prompt, n=4, seed=10, temperature=1.0,
                response_format={"type": "json_schema", "json_schema": {"schema": PERSON}})
    first, again = chat(http, **body), chat(http, **body)
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert texts_of(first) == texts_of(again)  # seeded and constrained: reproducible
    for text, _ in texts_of(again):
        jsonschema.validate(json.loads(text), PERSON)


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}},
     "response_format", "nonsense"),  # compile errors name the field the constraint came in
    ({"guided_regex": "([a-"}, "guided_regex", "regex"),
    ({"structured_outputs": {"grammar": "root ::= missing"}}, "structured_outputs.grammar",
     "missing"),
    ({"guided_json": '{"type": "object", "properties": '}, "guided_json", "JSON"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "one output constraint"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs",
     "exactly one"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "schema"),
    ({"guided_regex": "[0-9]+", "use_beam_search": True, "temperature": 0},
     "use_beam_search", "beam"),
]


@pytest.mark.parametrize("extra, param, words", BAD)
def test_bad_constraints_are_400s_and_the_server_keeps_serving(http, extra, param, words) -> None:
    for route, base in (("/v1/chat/completions", {"messages": CHAT}),
                        ("/v1/completions", {"prompt": "x"})):
        for stream in (False, True):
            resp = http.post(route, json={**base, **extra, "max_tokens": 5, "stream": stream})
            assert resp.status_code == 400, resp.text
            err = resp.json()["error"]
            assert err["param"] == param and words.lower() in err["message"].lower(), err
    ok = http.post("/v1/completions", json={"prompt": "still fine", "max_tokens": 3,
                                            "guided_regex": "[0-9]{3}"})
    assert ok.status_code == 200 and re.fullmatch("[0-9]{3}", ok.json()["choices"][0]["text"])


def test_concurrent_constrained_and_free_requests(http) -> None:
    def one(i: int) -> tuple[str, str]:
        if i % 2:
            return ("free", http.post("/v1/completions", json={
                "prompt": f"free {i}", "max_tokens": 8}).json()["choices"][0]["text"])
        return ("regex", texts_of(http.post("/v1/completions", json={
            "prompt": f"code {i}", "max_tokens": 8, "guided_regex": "[0-9]{4}"}))[0][0])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    assert all(re.fullmatch("[0-9]{4}", t) for kind, t in results if kind == "regex")
