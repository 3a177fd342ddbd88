"""The routes peers and proxies call, on a real `fornax serve` with API keys (main_server):
/v1/tokenize and /v1/detokenize (Olla's vLLM profile), the render routes in vLLM's shapes,
SGLang's /health_generate; /tokenizer_info exists only with --enable-tokenizer-info-endpoint
(tests/api/test_hub_models.py serves it)."""

from __future__ import annotations

import httpx
import pytest

from helpers.api_server import auth

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 6, "temperature": 0.0}


@pytest.fixture(scope="module")
def http(main_server):
    with httpx.Client(base_url=main_server.url, headers=auth(), timeout=60) as client:
        yield client


def test_v1_tokenize_and_detokenize_are_the_same_routes(http, main_server):
    for body in ({"prompt": "Hello there, fox"}, {"messages": CHAT["messages"],
                                                   "return_token_strs": True}):
        plain, v1 = http.post("/tokenize", json=body), http.post("/v1/tokenize", json=body)
        assert plain.status_code == v1.status_code == 200
        assert v1.json() == plain.json() and v1.json()["count"] == len(v1.json()["tokens"])
    tokens = http.post("/v1/tokenize", json={"prompt": "Hello there, fox",
                                             "add_special_tokens": False}).json()["tokens"]
    r = http.post("/v1/detokenize", json={"tokens": tokens})
    assert r.status_code == 200 and r.json() == {"prompt": "Hello there, fox"}
    bad = http.post("/v1/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    # the same key and limits as every other route
    assert httpx.post(main_server.url + "/v1/tokenize", json={"prompt": "x"}).status_code == 401
    big = http.post("/v1/tokenize", content=b'{"prompt": "' + b"a" * (1 << 20) + b'"}',
                    headers={"content-type": "application/json"})
    assert big.status_code == 413


def test_tokenizer_info_is_off_by_default_as_in_vllm(http):
    for path in ("/tokenizer_info", "/get_tokenizer_info"):
        assert http.get(path).status_code == 404


def test_chat_render_is_the_prompt_the_engine_gets(http):
    r = http.post("/v1/chat/completions/render", json={**CHAT, "temperature": 0.3, "top_k": 5,
                                                        "stop": ["x"], "request_id": "r1"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) >= {"request_id", "token_ids", "features", "sampling_params", "model",
                        "stream", "stream_options", "cache_salt", "priority",
                        "kv_transfer_params"}  # vLLM's GenerateRequest
    assert out["request_id"] == "chatcmpl-r1" and out["model"] == "tiny"
    assert out["features"] is None and out["stream"] is False and out["priority"] == 0
    chat_ids = http.post("/tokenize", json={"messages": CHAT["messages"]}).json()["tokens"]
    assert out["token_ids"] == chat_ids
    assert http.post("/tokenize", json={"prompt": out["prompt"], "add_special_tokens": False}
                     ).json()["tokens"] == chat_ids
    params = out["sampling_params"]
    assert (params["max_tokens"], params["temperature"], params["top_k"], params["stop"]) == \
        (6, 0.3, 5, ["x"])
    # the rendered ids, generated from as a raw prompt, give the chat's own answer (greedy)
    chat = http.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]
    raw = http.post("/v1/completions", json={"model": "tiny", "prompt": out["token_ids"],
                                             "max_tokens": 6, "temperature": 0.0}).json()
    assert raw["choices"][0]["text"] == chat["content"]


def test_completions_render_answers_one_request_per_prompt(http):
    r = http.post("/v1/completions/render", json={"prompt": ["Once upon", "a time"],
                                                  "max_tokens": 4, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    first, second = r.json()
    assert first["token_ids"] == http.post("/tokenize", json={"prompt": "Once upon"}
                                           ).json()["tokens"]
    assert first["prompt"] == "Once upon" and second["prompt"] == "a time"
    assert first["request_id"].startswith("cmpl-") and first["model"] is None
    assert first["stream"] is True and first["stream_options"]["include_usage"] is True
    assert first["sampling_params"]["max_tokens"] == 4
    ids = http.post("/v1/completions/render", json={"prompt": [5, 6, 7]}).json()
    assert [p["token_ids"] for p in ids] == [[5, 6, 7]] and ids[0]["prompt"]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions/render", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions/render", {"prompt": "hi", "temperature": -2}, "temperature"),
    ("/v1/completions/render", {"prompt": "hi", "use_beam_search": True, "n": 2},
     "use_beam_search"),
    ("/v1/chat/completions/render", {"messages": []}, "messages"),
    ("/v1/chat/completions/render", {**CHAT, "model": "other"}, "model"),
])
def test_render_refuses_what_generation_refuses(http, path, body, param):
    r = http.post(path, json=body)
    assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text


def test_health_generate_runs_the_engine_behind_the_key(http, main_server):
    assert http.get("/health_generate").status_code == 200
    assert httpx.get(main_server.url + "/health_generate", timeout=30).status_code == 401
