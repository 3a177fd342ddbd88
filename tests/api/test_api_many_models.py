"""One `fornax serve --models ...` with two tiny chat models and a tiny BERT embedder behind one
port: routing by `model` with the openai client (concurrently), the default per route, 404 for an
unknown model, route/model mismatches as on one-model servers, /v1/models, /health and /metrics
per model, and isolation: one model's engine killed answers 503 while the others serve, then it
comes back."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from fornax.perf.managed_server import engine_pids
from helpers.api_server import serving, tiny_model_path

pytestmark = pytest.mark.slow


def _bert() -> str:
    from tools.make_tiny_bert import tiny_bert_dir

    return str(tiny_bert_dir("bert-embed"))


@pytest.fixture(scope="module")
def server():
    entries = [{"model": str(tiny_model_path("llama")), "served_model_name": "chat-a",
                "max_model_len": 256},
               {"model": str(tiny_model_path("qwen2")), "served_model_name": ["chat-b", "b"],
                "max_model_len": 128},
               {"model": _bert(), "served_model_name": "embed"}]
    with serving(None, "--models", *map(json.dumps, entries), "--seed", "0",
                 timeout_s=300) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(client, model: str):
    return client.chat.completions.create(model=model, max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": "hi"}])


def test_models_lists_every_model_with_its_length_and_state(client):
    cards = {m.id: m.model_extra for m in client.models.list().data}
    assert list(cards) == ["chat-a", "chat-b", "b", "embed"]
    assert [cards[n]["max_model_len"] for n in ("chat-a", "chat-b")] == [256, 128]
    assert {c["status"] for c in cards.values()} == {"loaded"}
    assert client.models.retrieve("b").model_extra["max_model_len"] == 128
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_each_request_goes_to_the_model_it_names_concurrently(server, client):
    def one(i: int) -> str:
        kind = i % 3
        if kind == 2:
            return client.embeddings.create(model="embed", input=f"text {i}").model
        return _chat(client, ("chat-a", "chat-b")[kind]).model

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(one, range(18)))
    assert got == ["chat-a", "chat-b", "embed"] * 6
    assert _chat(client, "b").model == "b"  # an alias of chat-b
    # /v1/tokenize too: each model's own tokenizer and length
    lengths = [httpx.post(server.url + "/v1/tokenize", json={"model": m, "prompt": "hi"}).json()
               ["max_model_len"] for m in ("chat-a", "chat-b", "embed")]
    assert lengths[:2] == [256, 128] and lengths[2] > 0


def test_a_request_without_model_goes_to_the_first_model_of_its_route(server):
    chat = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).json()
    assert chat["model"] == "chat-a"
    emb = httpx.post(server.url + "/v1/embeddings", json={"input": "x"}, timeout=60).json()
    assert emb["model"] == "embed"


def test_unknown_model_is_404_and_mismatches_keep_their_errors(client):
    with pytest.raises(openai.NotFoundError) as info:
        _chat(client, "nope")
    assert info.value.body["param"] == "model" and "nope" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.APIStatusError) as info:  # chat on the embedder: 501, as always
        _chat(client, "embed")
    assert info.value.status_code == 501
    with pytest.raises(openai.APIStatusError) as info:  # embeddings on a chat model: 501
        client.embeddings.create(model="chat-a", input="x")
    assert info.value.status_code == 501


def test_metrics_and_health_cover_every_model(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/health", params={"model": "embed"}).status_code == 200
    assert httpx.get(server.url + "/health", params={"model": "nope"}).status_code == 404
    text = httpx.get(server.url + "/metrics", timeout=30).text
    for name in ("chat-a", "chat-b", "embed"):
        assert f'vllm:num_requests_running{{engine="0",model_name="{name}"}}' in text
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1  # one family, 3 samples


def _engine_pid(server, model_path: str) -> int:
    """The engine-core process serving `model_path` (a child of the server process)."""
    pids = engine_pids(server.proc.pid, model_path)
    assert pids, f"no engine process for {model_path}"
    return pids[0]


def test_a_dead_engine_fails_only_its_model_then_comes_back(server, client):
    pid = _engine_pid(server, str(tiny_model_path("qwen2")))
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while "the engine core of chat-b died" not in server.log():  # fornax serve noticed
        try:  # meanwhile chat-b fails with 503, or waits for its restarted engine
            _chat(client, "chat-b")
        except openai.InternalServerError as exc:
            assert exc.status_code == 503
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.2)
    assert _chat(client, "chat-a").model == "chat-a"  # the others keep serving
    assert client.embeddings.create(model="embed", input="x").model == "embed"
    health = httpx.get(server.url + "/health")  # 503 naming chat-b, unless it is back already
    assert health.status_code == 200 or "chat-b" in health.json()["error"]["message"]
    deadline = time.monotonic() + 180
    while True:  # restarted at once by fornax serve; the workers reconnect
        try:
            assert _chat(client, "chat-b").model == "chat-b"
            break
        except openai.InternalServerError:
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.5)
    assert httpx.get(server.url + "/health").status_code == 200
    assert _engine_pid(server, str(tiny_model_path("qwen2"))) != pid
    assert "the engine core of chat-b died" in server.log()


# ---- on demand: --max-loaded-models 1, idle unloading, keep_alive, load/unload ---------------
@pytest.fixture(scope="module")
def swapping():
    entries = [{"model": str(tiny_model_path("llama")), "served_model_name": "a",
                "max_model_len": 128},
               {"model": str(tiny_model_path("qwen2")), "served_model_name": "b",
                "max_model_len": 128, "idle_timeout": 4}]
    with serving(None, "--models", *map(json.dumps, entries), "--max-loaded-models", "1",
                 "--api-key", "k", timeout_s=300) as server:
        yield server


def _states(server) -> dict[str, str]:
    data = httpx.get(server.url + "/v1/models", headers={"authorization": "Bearer k"}).json()
    return {m["id"]: m["status"] for m in data["data"]}


def test_one_loaded_model_at_a_time_serves_alternating_requests(swapping):
    client = openai.OpenAI(base_url=swapping.url + "/v1", api_key="k", max_retries=0,
                           timeout=120)
    assert _states(swapping) == {"a": "loaded", "b": "unloaded"}
    assert [_chat(client, m).model for m in "bab"] == list("bab")  # a swap for each
    with ThreadPoolExecutor(4) as pool:  # concurrent requests for both: they wait their turn
        got = list(pool.map(lambda m: _chat(client, m).model, "abab"))
    assert got == list("abab")
    log = swapping.log()
    assert "least recently used, to load" in log and "loaded b in" in log


def test_an_idle_model_unloads_and_comes_back(swapping):
    client = openai.OpenAI(base_url=swapping.url + "/v1", api_key="k", max_retries=0,
                           timeout=120)
    assert _chat(client, "b").model == "b"
    pid = _engine_pid(swapping, str(tiny_model_path("qwen2")))
    deadline = time.monotonic() + 60
    while _states(swapping)["b"] != "unloaded":  # idle_timeout 4 s
        assert time.monotonic() < deadline, swapping.log()[-2000:]
        time.sleep(0.5)
    assert not os.path.exists(f"/proc/{pid}"), "the engine process still holds its memory"
    assert "unloading b (idle for" in swapping.log()
    assert _chat(client, "b").model == "b"  # loaded again for this request


def test_load_unload_routes_and_keep_alive(swapping):
    auth = {"authorization": "Bearer k"}
    assert httpx.post(swapping.url + "/v1/models/a/unload").status_code == 401
    assert httpx.post(swapping.url + "/v1/models/nope/load", headers=auth).status_code == 404
    assert httpx.post(swapping.url + "/v1/models/a/reload", headers=auth).status_code == 404
    loaded = httpx.post(swapping.url + "/v1/models/a/load", headers=auth, timeout=120)
    assert loaded.status_code == 200 and loaded.json()["status"] == "loaded"
    unloaded = httpx.post(swapping.url + "/v1/models/a/unload", headers=auth)
    assert unloaded.json()["status"] in ("unloading", "unloaded")
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for bad in ("soon", [5], "9999h", True, 1e12):
        r = httpx.post(swapping.url + "/v1/chat/completions", headers=auth,
                       json={**body, "keep_alive": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "keep_alive", r.text
    r = httpx.post(swapping.url + "/v1/chat/completions", headers=auth, timeout=120,
                   json={**body, "keep_alive": 0})  # unload as soon as it is answered
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while _states(swapping)["a"] != "unloaded":
        assert time.monotonic() < deadline
        time.sleep(0.3)


def test_unload_while_a_model_loads_takes_effect(swapping):
    """POST unload while a request's load of the model is under way answers "unloading", the
    waiting request gets a 503 naming the model (it does not hang), and the model ends unloaded
    instead of staying loaded; the next request loads it again."""
    auth = {"authorization": "Bearer k"}
    for model in "ab":
        httpx.post(swapping.url + f"/v1/models/{model}/unload", headers=auth)
    deadline = time.monotonic() + 60
    while set(_states(swapping).values()) != {"unloaded"}:
        assert time.monotonic() < deadline, swapping.log()[-2000:]
        time.sleep(0.2)
    body = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(httpx.post, swapping.url + "/v1/chat/completions", headers=auth,
                              json=body, timeout=120)
        while _states(swapping)["b"] != "loading":
            assert time.monotonic() < deadline and not waiting.done(), swapping.log()[-2000:]
            time.sleep(0.02)
        unloaded = httpx.post(swapping.url + "/v1/models/b/unload", headers=auth)
        assert unloaded.status_code == 200 and unloaded.json()["status"] == "unloading", \
            unloaded.text
        refused = waiting.result(timeout=60)
    assert refused.status_code == 503, refused.text
    assert "b was unloaded (POST /v1/models/{id}/unload) while it was loading" in \
        refused.json()["error"]["message"], refused.text
    while _states(swapping)["b"] != "unloaded":  # once its load is over
        assert time.monotonic() < deadline, swapping.log()[-2000:]
        time.sleep(0.2)
    assert "unloading b (POST unload) once it is done loading" in swapping.log()
    again = httpx.post(swapping.url + "/v1/chat/completions", headers=auth, json=body,
                       timeout=120)
    assert again.status_code == 200 and again.json()["model"] == "b", again.text
