"""fornax on Ray Serve, end to end on a local Ray cluster this module starts: the official openai
client through the ingress, load over two replicas, 503 past the queue bound, per-replica
/metrics, the realtime WebSocket relayed, autoscaling 1 -> 2 -> 1 on the engines' load, and a
killed replica child replaced while the app keeps serving. One cluster and one application for
the whole module."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import ray
from ray import serve
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from fornax.ray_serve.app import APP_NAME, application
from fornax.ray_serve.config import plan_from_mapping
from fornax.ray_serve.ingress import REPLICA_HEADER
from fornax.ray_serve.replica import LOAD_METRIC
from helpers.api_server import free_port, tiny_model_path
from helpers.bench import alive

pytestmark = pytest.mark.slow

# push the load signals every second (Ray's default is 10 s), before the cluster starts
_RAY_ENV = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
            "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}
_SEEN_PIDS: set[int] = set()  # every replica process and child: none may outlive the module


def _config(model: str) -> dict:
    return {
        "max_model_len": 1024, "kv_cache_memory": "32MiB", "seed": 0,
        "deployment": {"ray_actor_options": {"num_cpus": 0.5}, "health_check_period_s": 1,
                       "health_check_timeout_s": 10, "graceful_shutdown_timeout_s": 5},
        "models": [
            {"model": model, "served_model_name": "tiny",
             "deployment": {"num_replicas": 2, "max_ongoing_requests": 2,
                            "max_queued_requests": 4}},
            {"model": model, "served_model_name": "auto",
             "deployment": {"max_ongoing_requests": 8, "autoscaling_config": {
                 "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                 "upscale_delay_s": 0, "downscale_delay_s": 2, "look_back_period_s": 2}}},
        ]}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    saved = {k: os.environ.get(k) for k in _RAY_ENV}
    os.environ.update(_RAY_ENV)
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=100 * 1024 * 1024,
             logging_level="WARNING")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(plan_from_mapping(_config(str(tiny_model_path("llama"))))),
                  name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    deadline = time.monotonic() + 30
    while (left := [p for p in _SEEN_PIDS if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left after serve.shutdown: {left}"


def _replicas(deployment: str) -> list[dict]:
    """Every running replica of a deployment, described by itself (children's pids noted)."""
    handle = serve.get_deployment_handle(deployment, APP_NAME)
    found = handle.broadcast("describe").results(timeout_s=30, return_exceptions=True)
    described = [item for item in found if isinstance(item, dict)]
    for item in described:
        _SEEN_PIDS.update({item["pid"], item["actor_pid"]})
    return described


def _running(deployment: str) -> int:
    status = serve.status().applications[APP_NAME].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def _wait(what: str, check, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_openai_client_through_the_ingress(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    assert {m.id for m in client.models.list().data} == {"tiny", "auto"}
    chat = client.chat.completions.create(model="tiny", max_tokens=6,
                                          messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].finish_reason == "length" and chat.model == "tiny"
    stream = client.chat.completions.create(model="auto", max_tokens=6, stream=True,
                                            messages=[{"role": "user", "content": "hi"}])
    chunks = list(stream)
    assert len(chunks) >= 3 and chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks)
    pieces = list(client.completions.create(model="tiny", prompt="hello", max_tokens=5,
                                            stream=True))
    assert sum(len(p.choices[0].text) for p in pieces if p.choices) > 0
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert caught.value.body["param"] == "model"
    # a route that never generates passes through too, and a bad field is the child's 400
    tokens = httpx.post(url + "/tokenize", json={"model": "auto", "prompt": "hello"}, timeout=30)
    assert tokens.status_code == 200 and tokens.json()["tokens"]
    # a header value that is not ASCII (latin-1 on the wire) is carried, not a 500
    latin = httpx.post(url + "/tokenize", json={"model": "auto", "prompt": "hello"}, timeout=30,
                       headers={"x-note": "caf\xe9".encode("latin-1")})
    assert latin.status_code == 200, latin.text
    # no model: the first model serving the route (its runner from the replica's /load)
    unnamed = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                         timeout=30)
    assert unnamed.status_code == 200 and unnamed.json()["model"] == "tiny"
    bad = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x",
                                                    "max_tokens": -1}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


def test_realtime_websocket_is_relayed_to_a_replicas_child(url):
    """The session's frames and its close code come from the replica's fornax serve (a chat
    model: its first event is the error naming it, then 1008)."""
    ws_url = url.replace("http", "ws", 1) + "/v1/realtime?intent=transcription&model=tiny"
    with ws_connect(ws_url, open_timeout=30) as ws:
        event = json.loads(ws.recv(timeout=30))
        assert event["type"] == "error" and "not a speech-to-text model" in event["error"]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


def test_load_spreads_over_both_replicas_and_metrics_label_each(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

    def one(_: int) -> str:
        raw = client.completions.with_raw_response.create(model="tiny", prompt="a b c",
                                                          max_tokens=4)
        return raw.headers[REPLICA_HEADER]

    seen: list[str] = []
    for _ in range(4):  # 2 at a time: the replicas' max_ongoing_requests, no queueing
        with ThreadPoolExecutor(2) as pool:
            seen += list(pool.map(one, range(2)))
    assert len(set(seen)) == 2, seen
    assert set(seen) == {r["replica"] for r in _replicas("model0-tiny")}
    text = httpx.get(url + "/metrics", timeout=30).text
    for replica in set(seen):
        lines = [line for line in text.splitlines()
                 if line.startswith("vllm:request_success_total{") and
                 f'replica="{replica}"' in line and 'model_name="tiny"' in line]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in lines) >= seen.count(replica)
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1


def test_a_client_hanging_up_mid_stream_aborts_the_engines_request(url):
    """The disconnect travels proxy -> ingress -> replica -> child: its engine counts an abort
    (the request asked for 1000 tokens and is cut after its first chunks)."""
    def aborted() -> float:
        text = httpx.get(url + "/metrics", timeout=30).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("vllm:request_success_total{")
                   and 'finished_reason="abort"' in line and 'model_name="tiny"' in line)

    before = aborted()
    with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "a", "max_tokens": 1000, "ignore_eos": True,
            "stream": True}) as answer:
        assert answer.status_code == 200
        chunks = answer.iter_raw()
        next(chunks), next(chunks)
    _wait("the replica's engine to abort the request", lambda: aborted() == before + 1, 30)


def test_past_the_queue_bound_503_with_retry_after(url):
    body = {"model": "tiny", "prompt": "a", "max_tokens": 200, "ignore_eos": True}
    with ThreadPoolExecutor(20) as pool:  # 2 replicas x 2 ongoing + 4 queued fit; 12 do not
        answers = list(pool.map(lambda _: httpx.post(url + "/v1/completions", json=body,
                                                     timeout=120), range(20)))
    codes = sorted(a.status_code for a in answers)
    assert set(codes) == {200, 503}, codes
    for answer in answers:
        if answer.status_code == 503:
            assert answer.headers["retry-after"] == "1"
            assert answer.json()["error"]["type"] == "ServiceUnavailableError"
    assert codes.count(200) >= 4  # every replica's ongoing requests at least


def test_autoscaling_goes_one_two_one_on_engine_load(url):
    assert _running("model1-auto") == 1
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            httpx.post(url + "/v1/completions", timeout=120, json={
                "model": "auto", "prompt": "a", "max_tokens": 120, "ignore_eos": True})

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        _wait("a second replica under load", lambda: _running("model1-auto") == 2, 120)
        assert len(_replicas("model1-auto")) == 2
        # what each replica reports to the policy: its engine's running + waiting requests
        handle = serve.get_deployment_handle("model1-auto", APP_NAME)
        reports = handle.broadcast("record_autoscaling_stats").results(timeout_s=30)
        assert reports and all(set(r) == {LOAD_METRIC} and r[LOAD_METRIC] >= 0 for r in reports)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    _wait("back to one replica when idle", lambda: _running("model1-auto") == 1, 90)


def test_a_killed_child_leaves_the_app_serving_and_is_replaced(url):
    before = _replicas("model0-tiny")
    assert len(before) == 2
    victim = before[0]
    os.kill(victim["pid"], signal.SIGKILL)
    for _ in range(6):  # the other replica serves; a request refused by the dead one is retried
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x",
                                                      "max_tokens": 3}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers[REPLICA_HEADER] != victim["replica"]

    def replaced() -> bool:
        now = _replicas("model0-tiny")
        ids = {r["replica"] for r in now if r["alive"]}
        return len(ids) == 2 and victim["replica"] not in ids

    _wait("Ray to replace the replica whose child died", replaced, 120)
    assert not alive(victim["actor_pid"])


@pytest.fixture(scope="module")
def keyed(url) -> str:
    """A second application on the same cluster, with an API key (one model, one replica)."""
    config = {"max_model_len": 256, "kv_cache_memory": "16MiB", "api_key": "k",
              "deployment": {"ray_actor_options": {"num_cpus": 0.5}},
              "models": [{"model": str(tiny_model_path("llama")), "served_model_name": "tiny"}]}
    serve.run(application(plan_from_mapping(config)), name="keyed", route_prefix="/keyed")
    return url + "/keyed"


def test_the_ingress_checks_the_api_key_before_any_model_lookup(keyed):
    """An unknown model's 404 needs the key: without one every route but health answers 401
    (the WebSocket is refused before any model lookup), so model names cannot be probed; with
    it, the usual answers."""
    body = {"model": "probe", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"x-api-key": "kk"}):
        r = httpx.post(keyed + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError", r.text
        assert httpx.get(keyed + "/v1/models", headers=headers, timeout=60).status_code == 401
        assert httpx.get(keyed + "/metrics", headers=headers, timeout=60).status_code == 401
    ws_url = keyed.replace("http", "ws", 1) + "/v1/realtime?model=probe"
    with pytest.raises(InvalidStatus) as refused:  # closed before the handshake: 403
        ws_connect(ws_url, open_timeout=30)
    assert refused.value.response.status_code == 403
    assert httpx.get(keyed + "/health", timeout=60).status_code == 200
    auth = {"x-api-key": "k"}
    unknown = httpx.post(keyed + "/v1/chat/completions", json=body, headers=auth, timeout=60)
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    served = httpx.post(keyed + "/v1/chat/completions", json={**body, "model": "tiny"},
                        headers={"authorization": "Bearer k"}, timeout=120)
    assert served.status_code == 200 and served.json()["model"] == "tiny", served.text
