"""SageMaker /invocations (every body shape, on a chat model and on pooling models) and the batch
chat route /v1/chat/completions/batch, against real `fornax serve` processes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import httpx
import pytest

from fornax.api.routes.sagemaker import route_for
from fornax.api.server.errors import APIError
from helpers.api_server import ServerProcess, auth, sse_events

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": 12, "temperature": 0}
DOCS = ["The sea is big.", "Paris is in France.", "Tea is warm."]


@pytest.fixture(scope="module")
def http(main_server):
    with httpx.Client(base_url=main_server.url, headers=auth(), timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def cross(cross_server: ServerProcess) -> ServerProcess:
    """A tiny cross-encoder: it scores, reranks and classifies (embeddings are covered by the
    dispatch-rule test below and by the embeddings route's own tests). The session's
    (tests/api/conftest.py), shared with the pooling tests."""
    return cross_server


def _same(a: dict, b: dict) -> None:
    """Two answers equal but for their ids, timestamps and prefix-cache hits (and float noise:
    a pooled batch's composition moves the last bits)."""
    for obj in (a, b):
        for key in ("id", "created"):
            obj.pop(key, None)
        (obj.get("usage") or {}).pop("prompt_tokens_details", None)
    _close(a, b)


def _close(a: object, b: object) -> None:
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (a, b)
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys()
        for key in a:
            _close(a[key], b[key])
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _close(x, y)
    else:
        assert a == b


def test_invocations_chat_and_completions_answer_as_their_routes(http):
    direct = http.post("/v1/chat/completions", json=CHAT).json()
    via = http.post("/invocations", json=CHAT)
    assert via.status_code == 200 and via.json()["object"] == "chat.completion"
    _same(via.json(), direct)
    stream = http.post("/invocations", json={**CHAT, "stream": True})
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = sse_events(stream.text)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                   if e["choices"])
    assert text == direct["choices"][0]["message"]["content"]
    prompt = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    completion = http.post("/invocations", json=prompt)
    assert completion.status_code == 200 and completion.json()["object"] == "text_completion"
    _same(completion.json(), http.post("/v1/completions", json=prompt).json())


def test_invocations_refusals(http, main_server):
    for body, status in (({"foo": 1}, 400), ([1, 2], 400), ({"input": "x"}, 501)):
        r = http.post("/invocations", json=body)
        assert r.status_code == status, (body, r.text)
    bad_json = http.post("/invocations", content=b"{nope", headers={"content-type": "x"})
    assert bad_json.status_code == 400
    field = http.post("/invocations", json={**CHAT, "max_tokens": "many"})
    assert field.status_code == 400 and field.json()["error"]["param"] == "max_tokens"
    assert httpx.post(main_server.url + "/invocations", json=CHAT).status_code == 401


@pytest.mark.slow
def test_invocations_on_a_cross_encoder(cross):
    def both(server: ServerProcess, path: str, body: dict) -> tuple[dict, dict]:
        via = httpx.post(server.url + "/invocations", json=body, timeout=60)
        assert via.status_code == 200, via.text
        return via.json(), httpx.post(server.url + path, json=body, timeout=60).json()

    via, direct = both(cross, "/classify", {"input": DOCS})
    assert via["object"] == "list" and len(via["data"]) == 3
    _same(via, direct)
    pairs = {"text_1": "What is the sea?", "text_2": DOCS}
    _same(*both(cross, "/score", pairs))
    rerank = {"query": "What is the sea?", "documents": DOCS, "top_n": 2}
    via, direct = both(cross, "/rerank", rerank)
    assert len(via["results"]) == 2
    _same(via, direct)
    chat = httpx.post(cross.url + "/invocations", json={"prompt": "hi"}, timeout=60)
    assert chat.status_code == 501


def _state(runner: str, tasks: list[str]) -> SimpleNamespace:
    info = SimpleNamespace(tasks=tasks) if runner == "pooling" else None
    return SimpleNamespace(state=SimpleNamespace(
        engine_info=SimpleNamespace(runner=runner, pooling=info)))


@pytest.mark.parametrize(("runner", "tasks", "body", "path"), [
    ("generate", [], {"messages": []}, "/v1/chat/completions"),
    ("generate", [], {"prompt": "x"}, "/v1/completions"),
    ("pooling", ["embed"], {"messages": []}, "/v1/embeddings"),
    ("pooling", ["embed"], {"input": "x"}, "/v1/embeddings"),
    ("pooling", ["classify"], {"input": "x"}, "/classify"),
    ("pooling", ["classify"], {"messages": []}, "/classify"),
    ("pooling", ["score", "classify"], {"query": "q", "documents": ["d"]}, "/rerank"),
    ("pooling", ["score"], {"queries": "q", "documents": ["d"]}, "/score"),
    ("pooling", ["score"], {"data_1": "q", "data_2": "d"}, "/score"),
])
def test_invocations_dispatch_rule(runner, tasks, body, path):
    assert route_for(_state(runner, tasks), body)[0] == path  # type: ignore[arg-type]


def test_invocations_dispatch_rule_refuses_unknown_shapes():
    with pytest.raises(APIError) as exc:
        route_for(_state("generate", []), {"documents": ["d"]})  # type: ignore[arg-type]
    assert exc.value.status == 400


def test_batch_chat_answers_each_conversation_as_chat(http):
    convs = [CHAT["messages"], [{"role": "user", "content": "Name a colour."}]]
    singles = [http.post("/v1/chat/completions", json={**CHAT, "messages": c}).json()
               for c in convs]
    r = http.post("/v1/chat/completions/batch", json={**CHAT, "messages": convs})
    assert r.status_code == 200, r.text
    batch = r.json()
    assert batch["object"] == "chat.completion" and batch["model"] == "tiny"
    assert [c["index"] for c in batch["choices"]] == [0, 1]
    for choice, single in zip(batch["choices"], singles, strict=True):
        assert choice["message"]["content"] == single["choices"][0]["message"]["content"]
        assert choice["finish_reason"] == single["choices"][0]["finish_reason"]
    assert batch["usage"]["completion_tokens"] == sum(s["usage"]["completion_tokens"]
                                                      for s in singles)
    assert batch["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)


@pytest.mark.parametrize(("extra", "param"), [
    ({"stream": True}, "stream"), ({"n": 2}, "n"), ({"messages": []}, "messages"),
    ({"messages": [[{"role": "user", "content": "x"}], "oops"]}, "messages"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": [[{"role": "user", "content": "x"}], []]}, "messages"),
    ({"messages": [[{"role": "user", "content": "x"}], [{"content": "no role"}]]},
     "messages[1][0].role"),
    ({"max_tokens": "many"}, "max_tokens"),
])
def test_batch_chat_refusals_name_the_field(http, extra, param):
    body = {**CHAT, "messages": [CHAT["messages"], CHAT["messages"]], **extra}
    r = http.post("/v1/chat/completions/batch", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
