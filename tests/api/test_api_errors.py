"""Bad input, auth and CORS on a real `fornax serve`: the right status, the OpenAI error shape."""

from __future__ import annotations

import httpx
import openai
import pytest

from fornax.api.server.app import ROUTES
from helpers.api_server import API_KEYS, auth, raw_request


@pytest.fixture(scope="module")
def server(main_server):
    return main_server


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=auth(), timeout=60) as c:
        yield c


def _assert_error(resp: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["code"] == status
    if param != "any":
        assert err["param"] == param, err
    return err


def _path(route_path: str) -> str:
    return route_path.replace("{model}", "tiny")


def test_every_route_needs_a_key_but_health_ping_version(server):
    # /openapi.json and /docs hold only request shapes (vLLM serves them without a key too)
    public = {"/health", "/ping", "/version", "/openapi.json", "/docs"}
    assert public <= {r.path for r in ROUTES}
    for route in ROUTES:
        for method in route.methods:
            resp = httpx.request(method, server.url + _path(route.path), json={}, timeout=30)
            if route.path in public:
                assert resp.status_code == 200, (method, route.path)
            elif route.path.startswith("/v1/messages"):  # Anthropic's routes: Anthropic's shape
                assert resp.status_code == 401
                assert resp.json()["error"]["type"] == "authentication_error"
            else:
                _assert_error(resp, 401)
            bad = httpx.request(method, server.url + _path(route.path), json={},
                                headers={"Authorization": "Bearer wrong"}, timeout=30)
            assert (bad.status_code == 401) == (route.path not in public)
    for key in API_KEYS:
        assert httpx.get(server.url + "/v1/models", headers=auth(key)).status_code == 200
    _assert_error(httpx.get(server.url + "/v1/models", headers={"Authorization": API_KEYS[0]}),
                  401)


def test_early_refusal_of_a_large_body_is_answered_not_reset(server):
    """A request refused before its body is read (no key, unknown route) still gets its answer
    and leaves the connection usable: the unread upload (under the body limit) is drained first,
    instead of the socket being reset under a client that is still sending."""
    import socket
    import time

    body = b'{"prompt": "' + b"x" * 300_000 + b'"}'
    for path, key, status in (("/v1/completions", None, b" 401 "),
                              ("/no/such/route", API_KEYS[0], b" 404 ")):
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n"
                + (f"Authorization: Bearer {key}\r\n" if key else "") + "\r\n").encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(head + body[:1000])
            time.sleep(0.3)  # the server has refused by now; the client is still uploading
            sock.sendall(body[1000:])
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # same connection
            data = b""
            deadline = time.monotonic() + 10
            while data.count(b"HTTP/1.1 ") < 2 and time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        first, _, rest = data.partition(b"\r\n")
        assert status in first, data[:300]
        assert b"HTTP/1.1 200 " in rest, data[:600]


def test_openai_client_without_key_is_rejected(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


BAD_COMPLETIONS = [
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 2.0}, 400, "top_p"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": True}, 400, "n"),
    ({"prompt": "x", "stop": [1, 2]}, 400, "stop[0]"),
    ({"prompt": "x", "stop": ["s"] * 100}, 400, "stop"),
    ({"prompt": "x", "logprobs": 1000}, 400, "logprobs"),
    ({"prompt": "x", "seed": "abc"}, 400, "seed"),
    ({"prompt": "x", "seed": 2 ** 64}, 400, "seed"),
    ({"prompt": "x", "top_k": 2 ** 64}, 400, "top_k"),  # beyond int32: cannot reach the engine
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}}, 400,
     "stream_options.include_usage"),
    ({"prompt": "x", "model": "no-such-model"}, 404, "model"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, "a"]}, 400, "prompt"),
    ({"prompt": [[1, 2], "a"]}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [999999]}, 400, "prompt"),
    ({"prompt": [-1]}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"prompt": "x", "response_format": {"type": "yaml"}}, 400, "response_format.type"),
    ({"prompt": "x", "use_beam_search": True, "stream": True}, 400, "use_beam_search"),
    ({"prompt": "x", "length_penalty": 2.0}, 400, "length_penalty"),
    ({"prompt": "x", "truncate_prompt_tokens": 100000}, 400, "truncate_prompt_tokens"),
]


@pytest.mark.parametrize("body,status,param", BAD_COMPLETIONS)
def test_bad_completion_requests(http, body, status, param):
    _assert_error(http.post("/v1/completions", json=body), status, param)


BAD_CHAT = [
    ({"model": "tiny"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"content": "no role"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}, 400,
     "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto",
      "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ x }}"}, 400,
     "chat_template"),  # request templates need --trust-request-chat-template
    ({"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": True,
      "continue_final_message": True}, 400, "continue_final_message"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages"),
]


@pytest.mark.parametrize("body,status,param", BAD_CHAT)
def test_bad_chat_requests(http, body, status, param):
    _assert_error(http.post("/v1/chat/completions", json=body), status, param)


def test_malformed_and_odd_bodies(http):
    for body in (b"{not json", b"", b"[1, 2]", b'"just a string"', b"\xff\xfe"):
        _assert_error(http.post("/v1/completions", content=body), 400)
    _assert_error(http.post("/v1/completions", content=b"[" * 100000 + b"]" * 100000), 400)
    _assert_error(http.post("/tokenize", json={"model": "tiny"}), 400, "prompt")
    _assert_error(http.post("/detokenize", json={"tokens": [10 ** 9]}), 400, "tokens")
    _assert_error(http.post("/detokenize", json={"tokens": "abc"}), 400, "tokens")


def test_logit_bias_is_applied_or_refused_never_ignored(http):
    import dataclasses

    from fornax.runtime.sampling.params import SamplingParams

    body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "logit_bias": {"300": 100}}
    r = http.post("/v1/completions", json=body)
    if "logit_bias" in {f.name for f in dataclasses.fields(SamplingParams)}:
        assert r.status_code == 200, r.text
        want = http.post("/detokenize", json={"tokens": [300] * 4}).json()["prompt"]
        assert r.json()["choices"][0]["text"] == want
    else:
        _assert_error(r, 400, "logit_bias")


def test_unknown_fields_are_ignored(http):
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "vendor_extra": {"a": 1},
                                           "another": [1, 2]})
    assert r.status_code == 200


def test_prompt_longer_than_context_states_both_numbers(http):
    ids = http.post("/tokenize", json={"prompt": "the quick brown fox " * 200}).json()["tokens"]
    assert len(ids) > 512
    err = _assert_error(http.post("/v1/completions", json={"prompt": ids[:700]}), 400, "prompt")
    assert "512" in err["message"] and "700" in err["message"]
    err = _assert_error(http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "the quick brown fox " * 200}]}), 400, "messages")
    assert "512" in err["message"]


def test_body_over_limit_is_413(server, http):
    big = {"prompt": "x" * (1024 * 1024 + 10)}
    _assert_error(http.post("/v1/completions", json=big), 413)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEYS[0]}\r\n"
            "Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n").encode()
    answer = raw_request(server.port, head)  # refused before the body is sent
    assert answer.startswith(b"HTTP/1.1 413")

    def chunks():
        for _ in range(40):
            yield b"x" * 65536

    _assert_error(http.post("/v1/completions", content=chunks()), 413)  # chunked, no length


def test_unknown_route_and_wrong_method(http):
    _assert_error(http.get("/v1/nothing-here"), 404)
    r = http.get("/v1/completions")
    _assert_error(r, 405)
    assert "POST" in r.headers["allow"]


def test_cors_only_for_allowed_origins(server):
    good = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": "http://good.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert good.status_code == 204
    assert good.headers["access-control-allow-origin"] == "http://good.example"
    assert "POST" in good.headers["access-control-allow-methods"]
    bad = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert bad.status_code == 403 and "access-control-allow-origin" not in bad.headers
    simple = httpx.get(server.url + "/v1/models",
                       headers={**auth(), "Origin": "http://evil.example"})
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers
    simple = httpx.get(server.url + "/v1/models",
                       headers={**auth(), "Origin": "http://good.example"})
    assert simple.headers["access-control-allow-origin"] == "http://good.example"


def test_still_serving_after_bad_input(http):
    r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert http.get("/health").status_code == 200
