"""A many-model server's memory: `--max-loaded-memory` with a budget that fits one tiny chat model
(each given a 384 MiB KV cache) serves alternating requests for two while the engines' measured
RSS stays under it, and refuses a model larger than the budget with a 503 naming it; an idle
model with `idle_action: sleep` sleeps (its KV cache released: RSS drops) and its next request
wakes it; a request its model cannot serve gets its 501 without loading that model."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from fornax.perf.managed_server import engine_pids, rss_bytes
from helpers.api_server import serving, tiny_model_path

pytestmark = pytest.mark.slow

GIB, MIB = 2**30, 2**20
BUDGET = GIB


def _bert() -> str:
    from tools.make_tiny_bert import tiny_bert_dir

    return str(tiny_bert_dir("bert-embed"))


def _engines(server) -> dict[int, int]:
    """pid -> resident bytes of each engine-core process of the server."""
    return {pid: rss for pid in engine_pids(server.proc.pid) if (rss := rss_bytes(pid))}


def _engine_of(server, model_path: str) -> int:
    pids = engine_pids(server.proc.pid, model_path)
    assert pids, f"no engine process for {model_path}"
    return pids[0]


def _rss(pid: int) -> int:
    rss = rss_bytes(pid)
    assert rss, f"no engine process {pid}"
    return rss


def _states(server) -> dict[str, str]:
    data = httpx.get(server.url + "/v1/models", timeout=30).json()
    return {m["id"]: m["status"] for m in data["data"]}


def _chat(server, model: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", timeout=180, json={
        "model": model, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})


# ---- --max-loaded-memory ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def budgeted():
    llama, qwen = str(tiny_model_path("llama")), str(tiny_model_path("qwen2"))
    entries = [{"model": llama, "served_model_name": "a", "max_model_len": 128,
                "kv_cache_memory": "384MiB"},
               {"model": qwen, "served_model_name": "b", "max_model_len": 128,
                "kv_cache_memory": "384MiB"},
               {"model": llama, "served_model_name": "big", "max_model_len": 128,
                "kv_cache_memory": "1GiB"}]
    with serving(None, "--models", *map(json.dumps, entries), "--max-loaded-memory", "1GiB",
                 timeout_s=300) as server:
        yield server


def test_a_memory_budget_for_one_model_serves_two_alternating(budgeted):
    assert _states(budgeted) == {"a": "loaded", "b": "unloaded", "big": "unloaded"}
    most, stop = [0], threading.Event()

    def watch() -> None:  # the engines' RSS, sampled all along
        while not stop.is_set():
            most[0] = max(most[0], sum(_engines(budgeted).values()))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for model in "babab":
            r = _chat(budgeted, model)
            assert r.status_code == 200 and r.json()["model"] == model, r.text
    finally:
        stop.set()
        watcher.join()
    assert 0 < most[0] <= BUDGET, f"{most[0] / MIB:.0f} MiB of engines under a 1 GiB budget"
    log = budgeted.log()
    assert "--max-loaded-memory 1.00 GiB" in log and "least recently used, to load a" in log


def test_a_model_larger_than_the_budget_is_refused_naming_it(budgeted):
    r = _chat(budgeted, "big")
    assert r.status_code == 503 and "retry-after" not in r.headers, r.text
    message = r.json()["error"]["message"]
    assert "big needs" in message and "--max-loaded-memory 1.00 GiB" in message
    assert _states(budgeted)["big"] == "unloaded"
    assert "larger than the memory budget alone" in budgeted.log()


# ---- idle_action: sleep, and a route the model cannot serve ------------------------------------
@pytest.fixture(scope="module")
def sleepy():
    entries = [{"model": str(tiny_model_path("llama")), "served_model_name": "a",
                "max_model_len": 128, "kv_cache_memory": "256MiB", "idle_timeout": 3,
                "idle_action": "sleep"},
               {"model": _bert(), "served_model_name": "embed"}]
    with serving(None, "--models", *map(json.dumps, entries), timeout_s=300) as server:
        yield server


def test_an_idle_model_sleeps_and_its_next_request_wakes_it(sleepy):
    assert _chat(sleepy, "a").status_code == 200
    pid = _engine_of(sleepy, str(tiny_model_path("llama")))
    awake = _rss(pid)
    deadline = time.monotonic() + 60
    while _states(sleepy)["a"] != "asleep":  # idle_timeout 3 s
        assert time.monotonic() < deadline, sleepy.log()[-2000:]
        time.sleep(0.3)
    asleep = _rss(pid)
    assert awake - asleep > 200 * MIB, (awake, asleep)  # its 256 MiB KV cache went back
    r = _chat(sleepy, "a")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    assert _states(sleepy)["a"] == "loaded"
    assert _engine_of(sleepy, str(tiny_model_path("llama"))) == pid  # the same process, woken
    assert _rss(pid) - asleep > 200 * MIB
    assert "putting a to sleep (idle for" in sleepy.log() and "woke a in" in sleepy.log()


def test_a_route_the_model_cannot_serve_does_not_load_it(sleepy):
    loaded = _chat(sleepy, "embed")  # loaded: the chat route's 501 for a pooling model
    assert loaded.status_code == 501, loaded.text
    r = httpx.post(sleepy.url + "/v1/models/embed/unload", timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 60
    while _states(sleepy)["embed"] != "unloaded":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    unloaded = _chat(sleepy, "embed")
    assert unloaded.status_code == 501 and unloaded.json() == loaded.json()
    time.sleep(1)
    assert _states(sleepy)["embed"] == "unloaded"
    assert "embed is wanted" not in sleepy.log()
    r = httpx.post(sleepy.url + "/v1/embeddings", timeout=120,
                   json={"model": "embed", "input": "x"})
    assert r.status_code == 200 and _states(sleepy)["embed"] == "loaded"
