"""Dev endpoints on a real `fornax serve`: sleep/wake frees and restores engine memory, 503 while
asleep, identical answers after waking, prefix-cache reset, 404 without the flag."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from helpers.api_server import SURFACES_KV_MIB as KV_MIB
from helpers.api_server import auth

CHAT = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 16,
        "temperature": 0}


def _rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(surfaces_server):
    return surfaces_server


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _answer(http: httpx.Client) -> str:
    r = http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_dev_routes_are_404_without_the_flag(main_server):
    with httpx.Client(base_url=main_server.url, headers=auth(), timeout=30) as c:
        for method, path in (("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping"),
                             ("POST", "/reset_prefix_cache"), ("GET", "/sleep")):
            r = c.request(method, path)
            assert r.status_code == 404, (method, path, r.text)


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_frees_memory_and_wake_answers_identically(server, http, level):
    pid = server.engine_pid()
    before = _answer(http)
    awake_rss = _rss_mib(pid)
    assert http.post(f"/sleep?level={level}").status_code == 200
    assert http.get("/is_sleeping").json() == {"is_sleeping": True}
    asleep_rss = _rss_mib(pid)
    assert awake_rss - asleep_rss > 0.8 * KV_MIB, (awake_rss, asleep_rss)
    # generation is refused with 503; routes that need no weights keep working
    refused = http.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 503 and "sleeping" in refused.json()["error"]["message"]
    assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 503
    assert http.post("/tokenize", json={"prompt": "hello"}).status_code == 200
    assert http.get("/v1/models").status_code == 200
    assert http.get("/health").status_code == 200  # as vLLM: asleep on purpose is not unhealthy
    assert http.get("/health?deep=1").status_code == 503
    assert http.get("/health_generate").status_code == 503  # SGLang's: the engine cannot generate
    assert http.post(f"/sleep?level={level}").status_code == 200  # idempotent
    assert http.post("/wake_up").status_code == 200
    assert http.get("/is_sleeping").json() == {"is_sleeping": False}
    assert _rss_mib(pid) - asleep_rss > 0.8 * KV_MIB
    assert _answer(http) == before
    assert http.get("/health?deep=1").status_code == 200
    assert http.get("/health_generate").status_code == 200


def test_bad_sleep_requests(http):
    r = http.post("/sleep?level=3")
    assert r.status_code == 400 and r.json()["error"]["param"] == "level"
    assert http.post("/wake_up?tags=weights").status_code == 400
    assert http.post("/wake_up").status_code == 200  # awake already: a no-op


def test_sleep_is_refused_while_a_request_runs(server, http):
    body = json.dumps({"prompt": "Once", "max_tokens": 400, "ignore_eos": True,
                       "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: " + str(len(body)).encode() +
                     b"\r\n\r\n" + body)
        got = b""
        while b"data: " not in got:
            data = sock.recv(4096)
            assert data, got
            got += data
        r = http.post("/sleep?level=1")
        assert r.status_code == 409 and "in flight" in r.json()["error"]["message"]
        assert http.get("/is_sleeping").json() == {"is_sleeping": False}
    finally:
        sock.close()
    deadline = time.monotonic() + 30  # the disconnect aborts the stream; then sleep works
    while http.post("/sleep?level=1").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert http.post("/wake_up").status_code == 200


def test_reset_prefix_cache(http):
    prompt = {"prompt": "The quick brown fox jumps over the lazy dog " * 4, "max_tokens": 1}
    first = http.post("/v1/completions", json=prompt).json()["usage"]
    again = http.post("/v1/completions", json=prompt).json()["usage"]
    assert again["prompt_tokens_details"]["cached_tokens"] > 0, (first, again)
    assert http.post("/reset_prefix_cache").status_code == 200
    after = http.post("/v1/completions", json=prompt).json()["usage"]
    assert after["prompt_tokens_details"]["cached_tokens"] == 0
