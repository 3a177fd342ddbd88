"""Every input bounded and checked once at the edge: bad values are 400s naming the field, on a
real `fornax serve`, and the engine keeps serving (issue #18's repros are regression tests)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import msgspec
import pytest

from fornax.runtime import limits
from fornax.runtime.engine.messages import EngineCoreRequest
from fornax.runtime.errors import RequestError
from fornax.runtime.sampling.params import SamplingParams
from helpers.api_server import auth

VOCAB = 512  # tools/make_tiny_model.py's MODEL_VOCAB


@pytest.fixture(scope="module")
def server(main_server):
    return main_server


@pytest.fixture(scope="module")
def http(server, engine_pid):  # the engine's pid is taken before the first bad request
    with httpx.Client(base_url=server.url, headers=auth(), timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def engine_pid(server) -> int:
    return server.engine_pid()


def _bad(resp: httpx.Response, param: str | None) -> dict[str, Any]:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400
    assert err["param"] == param, err
    return err


def _completion(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "hi", "max_tokens": 4, **fields}


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            **fields}


# ---- the issue's repros ---------------------------------------------------------------------

REPROS = [
    (_completion(min_tokens=1, stop_token_ids=[1_000_000_000]), "stop_token_ids"),
    (_completion(temperature=1.0, top_k=2_147_483_648), "top_k"),
    (_completion(seed=2**64), "seed"),
    (_completion(logit_bias={"²": 5}), "logit_bias"),
    (_completion(request_id="a\r\nb"), "request_id"),
    (_completion(request_id="a\u2028b"), "request_id"),
    (_completion(request_id="名前"), "request_id"),
]


@pytest.mark.parametrize("body,param", REPROS, ids=[p for _, p in REPROS])
def test_issue_repros_are_400s_naming_the_field(http, body, param):
    _bad(http.post("/v1/completions", json=body), param)
    _bad(http.post("/v1/chat/completions",
                   json={**_chat(), **{k: v for k, v in body.items() if k != "prompt"}}), param)


@pytest.mark.parametrize("value", [b"caf\xc3\xa9", b"\xe2\x80\xa8", b"a\tb", b"x" * 300])
def test_unsafe_x_request_id_header_is_refused_before_any_work_and_never_echoed(http, value):
    resp = http.post("/v1/completions", json=_completion(),
                     headers={**auth(), "x-request-id": value})
    _bad(resp, "x-request-id")
    assert "x-request-id" not in resp.headers


def test_safe_request_ids_are_echoed(http):
    resp = http.post("/v1/completions", json=_completion(), headers={"x-request-id": "req-1 a"})
    assert resp.status_code == 200 and resp.json()["id"] == "cmpl-req-1 a"
    assert resp.headers["x-request-id"] in ("req-1 a", "cmpl-req-1 a")
    resp = http.post("/v1/completions", json=_completion(request_id="mine-7"))
    assert resp.status_code == 200 and resp.json()["id"] == "cmpl-mine-7"


# ---- every bounded field --------------------------------------------------------------------

COMPLETION_TABLE: list[tuple[str, Any, str]] = [
    ("top_k", 2**31, "top_k"),
    ("top_k", -2, "top_k"),
    ("seed", -(2**63) - 1, "seed"),
    ("n", 0, "n"),
    ("n", limits.MAX_N + 1, "n"),
    ("n", 2**63, "n"),
    ("best_of", 2**31, "best_of"),
    ("max_tokens", 0, "max_tokens"),
    ("min_tokens", 2**40, "min_tokens"),
    ("logprobs", 2**31, "logprobs"),
    ("prompt_logprobs", 2**40, "prompt_logprobs"),
    ("truncate_prompt_tokens", 2**40, "truncate_prompt_tokens"),
    ("priority", 2**63, "priority"),
    ("presence_penalty", 3.0, "presence_penalty"),
    ("repetition_penalty", 0.0, "repetition_penalty"),
    ("top_p", 0.0, "top_p"),
    ("min_p", 2.0, "min_p"),
    ("stop_token_ids", [VOCAB], "stop_token_ids"),
    ("stop_token_ids", [-1], "stop_token_ids"),
    ("stop_token_ids", [1] * (limits.MAX_STOP_TOKEN_IDS + 1), "stop_token_ids"),
    ("allowed_token_ids", [VOCAB], "allowed_token_ids"),
    ("allowed_token_ids", [2**63], "allowed_token_ids"),
    ("logit_bias", {str(VOCAB): 1}, "logit_bias"),
    ("logit_bias", {"99999999999999999999999": 1}, "logit_bias"),
    ("logit_bias", {"1": 1000}, "logit_bias"),
    ("logit_bias", {str(i): 1 for i in range(limits.MAX_LOGIT_BIAS + 1)}, "logit_bias"),
    ("bad_words", ["x"] * (limits.MAX_BAD_WORDS + 1), "bad_words"),
    ("bad_words", ["a" * (limits.MAX_BAD_WORD_CHARS + 1)], "bad_words"),
    ("stop", ["s"] * (limits.MAX_STOP_STRINGS + 1), "stop"),
    ("stop", "x" * (limits.MAX_STOP_STRING_CHARS + 1), "stop"),
    ("repetition_detection", {"max_pattern_size": 10**6}, "repetition_detection.max_pattern_size"),
    ("repetition_detection", {"min_count": 10**9}, "repetition_detection.min_count"),
    ("request_id", "x" * (limits.MAX_REQUEST_ID_CHARS + 1), "request_id"),
    ("request_id", "", "request_id"),
    ("cache_salt", "x" * (limits.MAX_CACHE_SALT_CHARS + 1), "cache_salt"),
    ("user", "x" * (limits.MAX_USER_CHARS + 1), "user"),
    ("structured_outputs", {"regex": "a" * (limits.MAX_GRAMMAR_CHARS + 1)},
     "structured_outputs.regex"),
    ("prompt", ["hi"] * (limits.MAX_PROMPTS + 1), "prompt"),
]


@pytest.mark.parametrize("field,value,param", COMPLETION_TABLE,
                         ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(COMPLETION_TABLE)])
def test_completions_field_bounds(http, field, value, param):
    _bad(http.post("/v1/completions", json=_completion(**{field: value})), param)


CHAT_TABLE: list[tuple[dict[str, Any], str]] = [
    ({"logprobs": True, "top_logprobs": 2**31}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "a"}] * (limits.MAX_MESSAGES + 1)}, "messages"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}] * (limits.MAX_TOOLS + 1)},
     "tools"),
    ({"documents": [{"text": "d"}] * (limits.MAX_DOCUMENTS + 1)}, "documents"),
    ({"chat_template": "x" * (limits.MAX_CHAT_TEMPLATE_CHARS + 1)}, "chat_template"),
    ({"n": limits.MAX_N + 1}, "n"),
    ({"use_beam_search": True, "temperature": 0, "n": limits.MAX_N + 1}, "n"),
    ({"use_beam_search": True, "temperature": 0, "n": 2, "best_of": 10**6}, "best_of"),
    ({"use_beam_search": True, "temperature": 0, "length_penalty": 1e300}, "length_penalty"),
]


@pytest.mark.parametrize("fields,param", CHAT_TABLE, ids=[p for _, p in CHAT_TABLE])
def test_chat_field_bounds(http, fields, param):
    _bad(http.post("/v1/chat/completions", json=_chat(**fields)), param)


def test_non_finite_floats_are_refused_naming_the_field(http):
    body = json.dumps(_completion()).replace('"max_tokens": 4', '"max_tokens": 4, '
                                             '"temperature": 1e999').encode()
    resp = http.post("/v1/completions", content=body,
                     headers={**auth(), "content-type": "application/json"})
    _bad(resp, "temperature")


def test_fan_out_of_prompts_times_n_is_capped(http):
    prompts = ["hi"] * (limits.MAX_CHOICES_PER_REQUEST // limits.MAX_N + 1)
    _bad(http.post("/v1/completions", json=_completion(prompt=prompts, n=limits.MAX_N)), "n")


def test_pooling_route_request_id_is_checked_while_decoding(http):
    _bad(http.post("/v1/embeddings", json={"model": "tiny", "input": "x",
                                           "request_id": "a\nb"}), "request_id")


# ---- JSON depth on every JSON route ----------------------------------------------------------

def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("path,body", [
    ("/invocations", {"prompt": _deep(limits.MAX_JSON_DEPTH + 1)}),
    ("/invocations", {"messages": _deep(5000)}),
    ("/v1/chat/completions/batch", {"model": "tiny", "messages": [[{"role": "user",
                                                                     "content": _deep(5000)}]]}),
    ("/v1/chat/completions", _chat(tools=[{"x": _deep(5000)}])),
    ("/v1/completions", _completion(prompt=_deep(limits.MAX_JSON_DEPTH + 1))),
    ("/v1/messages", {"model": "tiny", "max_tokens": 4, "metadata": {"x": _deep(5000)},
                      "messages": [{"role": "user", "content": "hi"}]}),
], ids=["invocations", "invocations-5000", "batch", "chat", "completions", "anthropic"])
def test_deeply_nested_json_is_a_400(http, path, body):
    import sys

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # the client's own encoder walks the nesting
    try:
        content = json.dumps(body).encode()
    finally:
        sys.setrecursionlimit(old)
    resp = http.post(path, content=content, headers={**auth(), "content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert "deeper than" in resp.text


def test_brackets_inside_strings_do_not_count_as_depth(http):
    text = '"' + "[" * 150 + '\\"' + "{" * 150  # escaped quotes inside the string too
    assert text.count("[") + text.count("{") > limits.MAX_JSON_DEPTH
    resp = http.post("/v1/completions", json=_completion(prompt=text))
    assert resp.status_code == 200, resp.text


def test_large_requests_are_prepared_off_the_loop_with_the_same_answers(http):
    text = "word " * (limits.OFFLOAD_CHARS // 4)  # a body past the off-loop threshold
    small = http.post("/tokenize", json={"model": "tiny", "prompt": "word word"}).json()
    large = http.post("/tokenize", json={"model": "tiny", "prompt": text})
    assert large.status_code == 200 and large.json()["tokens"][:2] == small["tokens"][:2]
    chat = http.post("/tokenize", json={"model": "tiny",
                                        "messages": [{"role": "user", "content": text}]})
    assert chat.status_code == 200 and chat.json()["count"] > large.json()["count"] // 2
    _bad(http.post("/v1/chat/completions", json=_chat(messages=[{"role": "user",
                                                                  "content": text}])), "messages")


def test_empty_x_request_id_header_is_no_id_not_an_error(http):
    resp = http.post("/v1/completions", json=_completion(), headers={"x-request-id": ""})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("fields,param", [
    ({"stop_token_ids": [1_000_000_000]}, "stop_token_ids"),
    ({"logit_bias": {"999999999": 5}}, "logit_bias"),
    ({"stop": ["a"] * (limits.MAX_STOP_STRINGS + 1)}, "stop"),
    ({"n": 0}, "n"),
])
def test_beam_search_requests_pass_the_same_validation(http, fields, param):
    _bad(http.post("/v1/completions", json=_completion(use_beam_search=True, temperature=0,
                                                       **fields)), param)
    _bad(http.post("/v1/chat/completions", json=_chat(use_beam_search=True, temperature=0,
                                                      **fields)), param)


def test_absurdly_nested_tool_call_arguments_are_kept_as_text(http):
    args = "[" * 3000 + "]" * 3000  # inside a string: no JSON depth, but json.loads recurses
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                      "function": {"name": "f",
                                                                   "arguments": args}}]}]
    resp = http.post("/tokenize", json={"model": "tiny", "messages": messages})
    assert resp.status_code == 200, resp.text


def test_detokenize_is_bounded(http):
    from fornax.api.protocol.openai import DetokenizeRequest

    too_many = {"tokens": [1] * (limits.MAX_DETOKENIZE_TOKENS + 1)}  # past this server's 1 MiB
    with pytest.raises(msgspec.ValidationError, match="tokens"):
        msgspec.json.decode(json.dumps(too_many), type=DetokenizeRequest)
    assert http.post("/detokenize", json={"model": "tiny", "tokens": [1, 2]}).status_code == 200


# ---- the engine stayed up --------------------------------------------------------------------

def test_engine_survived_every_case_above(server, http, engine_pid):
    # module order: this runs after every bad request above
    assert server.proc.poll() is None and server.engine_pid() == engine_pid
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    resp = http.post("/v1/completions", json=_completion(min_tokens=1, stop_token_ids=[VOCAB - 1],
                                                          top_k=VOCAB * 10, seed=2**63 - 1,
                                                          logit_bias={"5": 1.0}))
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] is not None


# ---- one validation layer -------------------------------------------------------------------

def _count_validate(monkeypatch) -> list[int]:
    calls = [0]
    original = SamplingParams.validate

    def counting(self, *args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        original(self, *args, **kwargs)

    monkeypatch.setattr(SamplingParams, "validate", counting)
    return calls


def test_engine_side_decoding_and_cloning_do_not_validate(monkeypatch):
    calls = _count_validate(monkeypatch)
    params = SamplingParams(temperature=0.5, stop=["x"], logit_bias={"3": 1.0}, seed=1)
    wire = msgspec.msgpack.encode(EngineCoreRequest("r", [1, 2], params))
    decoded = msgspec.msgpack.decode(wire, type=EngineCoreRequest)
    assert decoded.sampling_params.logit_bias == {3: 1.0}
    decoded.sampling_params.clone(n=1, seed=2)
    assert calls[0] == 0


def test_offline_llm_validates_once_per_request_and_the_engine_not_again(make_llm, monkeypatch):
    llm = make_llm()
    calls = _count_validate(monkeypatch)
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=3)
    outs = llm.generate(["one", "two"], params)
    assert len(outs) == 2 and all(len(o.outputs) == 3 for o in outs)
    assert calls[0] == 1  # one SamplingParams object for both prompts: checked once
    with pytest.raises(RequestError, match="stop_token_ids"):
        llm.generate("x", SamplingParams(min_tokens=1, stop_token_ids=[10**9]))
    assert llm.generate("still serving", SamplingParams(max_tokens=2))[0].outputs[0].token_ids


# ---- building blocks ------------------------------------------------------------------------

@pytest.mark.parametrize("text,deep", [
    (b"[" * 128 + b"]" * 128, False),
    (b"[" * 129 + b"]" * 129, True),
    (b'{"a":' * 129 + b"1" + b"}" * 129, True),
    (b"[" + b"[]," * 500 + b"[]]", False),  # wide, not deep
    (b'["' + b"[{" * 300 + b'\\"]"]', False),  # brackets inside a string
    (b"[" * 300, True),  # unbalanced, and already deeper than the limit where it stops
    (b"[" * 100 + b"]" * 100 + b"[" * 100 + b"]" * 100, False),  # deep twice, never too deep
])
def test_json_depth_scanner(text, deep):
    assert limits.json_too_deep(text) is deep


@pytest.mark.parametrize("value,ok", [
    ("req-1", True), ("a b", True), ("x" * limits.MAX_REQUEST_ID_CHARS, True), ("", False),
    ("a\nb", False), ("a\r", False), ("ab\n", False), ("a\u2028", False), ("é", False),
    (" a", False), ("a\tb", False), ("x" * (limits.MAX_REQUEST_ID_CHARS + 1), False),
])
def test_request_id_rules(value, ok):
    assert (limits.request_id_problem(value) is None) is ok


def test_large_request_preparation_runs_off_the_event_loop():
    import asyncio
    import threading

    from fornax.api.server.offload import prepare

    class FakeRequest:
        def __init__(self, size: int) -> None:
            self._size = size

        async def body(self) -> bytes:
            return b"x" * self._size

    def where() -> str:
        return threading.current_thread().name

    async def run() -> tuple[str, str]:
        small = await prepare(FakeRequest(10), where)  # type: ignore[arg-type]
        large = await prepare(FakeRequest(limits.OFFLOAD_CHARS), where)  # type: ignore[arg-type]
        return small, large

    small, large = asyncio.run(run())
    assert small == threading.current_thread().name and large.startswith("fornax-prep")


def test_operator_limits_reach_the_checks():
    from fornax.api.server.settings import ServerSettings
    from fornax.runtime.sampling.beam_search import BeamSearchParams

    tight = limits.InputLimits(max_n=4, max_stop_strings=2, max_prompts=8)
    encoded = msgspec.json.encode({"input_limits": tight})
    assert msgspec.json.decode(encoded, type=dict)["input_limits"]["max_n"] == 4
    assert ServerSettings.__struct_fields__.count("input_limits") == 1
    with pytest.raises(RequestError) as err:
        SamplingParams(n=5).validate(limits=tight)
    assert err.value.param == "n"
    with pytest.raises(RequestError) as err:
        SamplingParams(stop=["a", "b", "c"]).validate(limits=tight)
    assert err.value.param == "stop" and "--max-stop-strings" in str(err.value)
    SamplingParams(n=4, stop=["a", "b"]).validate(limits=tight)
    with pytest.raises(RequestError):
        BeamSearchParams(beam_width=5, max_tokens=4, max_width=4)
