"""The Responses store's safety rules on a real `fornax serve` with two API keys, for the memory
and the SQLite store: server-made ids (a client request_id is never an id), records owned by the
key that made them, per-record and total caps, the background cap per key; and the too-large
answer paths of ResponseRun without a server."""

from __future__ import annotations

import asyncio
import time

import httpx
import msgspec
import pytest

from fornax.api.protocol.openai import ChatChoice, ChatCompletionResponse, ChatMessage, UsageInfo
from fornax.api.protocol.responses import ResponsesRequest
from fornax.api.responses.store import (
    MemoryResponseStore,
    RecordTooLarge,
    SQLiteResponseStore,
    StoredResponse,
    owner_of,
)
from fornax.api.responses.stream import ResponseRun
from helpers.api_server import API_KEYS, ServerProcess, auth, tiny_model_path

A, B = auth(API_KEYS[0]), auth(API_KEYS[1])
RECORD_CAP = 32 * 1024
MAX_COUNT = 4
LONG = {"max_output_tokens": 1500, "ignore_eos": True}  # still running when the test looks


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """memory: one API worker (its store is per worker); sqlite: two workers sharing a file."""
    db = tmp_path_factory.mktemp("responses") / "store.db"
    common = ("--api-key", *API_KEYS, "--served-model-name", "tiny", "--max-model-len", "2048",
              "--responses-store-max-record-bytes", str(RECORD_CAP),
              "--responses-store-max-count", str(MAX_COUNT), "--responses-max-background", "1")
    model = str(tiny_model_path("llama"))
    started = {"memory": ServerProcess(model, *common, "--api-server-count", "1"),
               "sqlite": ServerProcess(model, *common, "--api-server-count", "2",
                                       "--responses-store", f"sqlite:{db}")}
    try:
        yield {kind: server.wait_ready() for kind, server in started.items()}
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(params=["memory", "sqlite"])
def http(request, servers):
    with httpx.Client(base_url=servers[request.param].url, timeout=60) as client:
        client.workers = 1 if request.param == "memory" else 2  # type: ignore[attr-defined]
        yield client


def _create(http: httpx.Client, key: dict[str, str], **body) -> httpx.Response:
    return http.post("/v1/responses", headers=key,
                     json={"model": "tiny", "input": "hi", "max_output_tokens": 2, **body})


@pytest.mark.slow
def test_a_client_request_id_is_never_the_response_id(http):
    r = _create(http, A, request_id="my-id")
    assert r.status_code == 200, r.text
    rid = r.json()["id"]
    assert rid.startswith("resp_") and "my-id" not in rid and len(rid) >= 32
    assert r.headers["x-request-id"] == "my-id"  # the client's id is only echoed
    assert http.get("/v1/responses/resp_my-id", headers=A).status_code == 404
    again = _create(http, A, request_id="my-id")  # the same request_id: a new response
    assert again.json()["id"] != rid
    assert http.get(f"/v1/responses/{rid}", headers=A).status_code == 200  # not overwritten
    for bad in ("a\r\nb", "x" * 10_000, "caf\u00e9", "a\u2028b"):
        refused = _create(http, A, request_id=bad)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "request_id"


def _error(r: httpx.Response, status: int, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    if param is not None:
        assert r.json()["error"]["param"] == param, r.text


@pytest.mark.slow
def test_another_keys_response_does_not_exist_for_it(http):
    rid = _create(http, A).json()["id"]
    assert http.get(f"/v1/responses/{rid}", headers=A).json()["id"] == rid
    x_api_key = {"x-api-key": API_KEYS[0]}  # the same key sent the Anthropic way owns it too
    assert http.get(f"/v1/responses/{rid}", headers=x_api_key).status_code == 200
    _error(http.get(f"/v1/responses/{rid}", headers=B), 404, "response_id")
    _error(http.get(f"/v1/responses/{rid}/input_items", headers=B), 404, "response_id")
    _error(http.delete(f"/v1/responses/{rid}", headers=B), 404, "response_id")
    _error(http.post(f"/v1/responses/{rid}/cancel", headers=B), 404, "response_id")
    _error(_create(http, B, previous_response_id=rid), 404, "previous_response_id")
    follow = _create(http, A, previous_response_id=rid)  # its own key continues it
    assert follow.status_code == 200, follow.text
    assert http.get(f"/v1/responses/{rid}", headers=A).status_code == 200  # B deleted nothing
    assert http.delete(f"/v1/responses/{rid}", headers=A).json()["deleted"] is True
    assert http.get(f"/v1/responses/{rid}", headers=A).status_code == 404


def _wait_status(http: httpx.Client, rid: str, statuses: set[str]) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = http.get(f"/v1/responses/{rid}", headers=A).json()
        if got["status"] in statuses:
            return got
        time.sleep(0.05)
    raise AssertionError(f"{rid} never reached {statuses}")


@pytest.mark.slow
def test_background_is_owned_and_capped_per_key(http):
    started, refused = [], []
    for _ in range(http.workers + 1):  # one per worker at most: at least one refusal
        r = _create(http, A, background=True, **LONG)
        (started if r.status_code == 200 else refused).append(r)
    assert 1 <= len(started) <= http.workers and refused, [r.text for r in refused]
    for r in refused:
        _error(r, 429, "background")
        assert r.headers["retry-after"] == "1"
    rid = started[0].json()["id"]
    try:
        _wait_status(http, rid, {"in_progress"})
        _error(http.post(f"/v1/responses/{rid}/cancel", headers=B), 404, "response_id")
        _error(http.delete(f"/v1/responses/{rid}", headers=B), 404, "response_id")
        assert http.get(f"/v1/responses/{rid}", headers=A).json()["status"] == "in_progress"
        other = _create(http, B, background=True, max_output_tokens=2)  # B's own slot
        assert other.status_code == 200, other.text
    finally:
        for r in started:
            http.post(f"/v1/responses/{r.json()['id']}/cancel", headers=A)
    assert _wait_status(http, rid, {"cancelled"})["status"] == "cancelled"


@pytest.mark.slow
def test_record_and_count_caps(http):
    big = {"note": "x" * RECORD_CAP}  # stored with the response, never shown to the model
    _error(_create(http, A, metadata=big), 400, "store")
    unstored = _create(http, A, metadata=big, store=False)  # answered, not kept
    assert unstored.status_code == 200 and unstored.json()["store"] is False
    assert http.get(f"/v1/responses/{unstored.json()['id']}", headers=A).status_code == 404
    ids = [_create(http, A).json()["id"] for _ in range(MAX_COUNT + 2)]
    kept = [http.get(f"/v1/responses/{rid}", headers=A).status_code == 200 for rid in ids]
    assert kept == [False] * 2 + [True] * MAX_COUNT  # the oldest went first


# ---- without a server ------------------------------------------------------------------------


def _store(kind: str, tmp_path, **caps):
    if kind == "memory":
        return MemoryResponseStore(max_age_s=60.0, **caps)
    return SQLiteResponseStore(str(tmp_path / "s.db"), max_age_s=60.0, **caps)


def _record(i: int, size: int = 0, owner: str = "") -> StoredResponse:
    return StoredResponse({"id": f"r{i}", "status": "completed", "text": "x" * size}, [],
                          time.time() + i * 1e-3, owner=owner)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_store_byte_caps_and_owners(kind, tmp_path):
    async def run() -> None:
        store = _store(kind, tmp_path, max_count=100, max_bytes=10_000, max_record_bytes=3_000)
        with pytest.raises(RecordTooLarge):
            await store.put("huge", _record(0, 3_000))
        for i in range(10):  # 10 records of ~2 kB under a 10 kB cap: the oldest go
            if kind == "sqlite":
                store._last_prune = -1e9
            assert await store.put(f"r{i}", _record(i, 2_000))
        rows, size = store.stats()
        assert size <= 10_000 and rows < 10
        assert await store.get("r9") is not None and await store.get("r0") is None
        mine, theirs = owner_of("k1"), owner_of("k2")
        assert mine and mine != theirs and "k1" not in mine
        assert await store.put("owned", _record(20, owner=mine))
        assert await store.get("owned") is None and await store.get("owned", theirs) is None
        assert (await store.get("owned", mine)).owner == mine
        assert await store.put("owned", _record(21, owner=theirs)) is False  # no takeover
        assert not await store.delete("owned", theirs) and await store.cancel("owned") is None
        assert await store.delete("owned", mine)
        store.close()

    asyncio.run(run())


@pytest.mark.parametrize("background", [False, True])
def test_an_answer_too_large_to_store(background):
    async def run() -> None:
        store = MemoryResponseStore(10, 60.0, max_record_bytes=4_000)
        body = ResponsesRequest(input="hi", background=background)
        run = ResponseRun(store, "resp_1", body, "tiny", [{"role": "user", "content": "hi"}])
        if background:
            assert await run.save()  # stored queued when it starts
        answer = ChatCompletionResponse(
            id="chatcmpl-1", created=0, model="tiny", usage=UsageInfo(),
            choices=[ChatChoice(index=0, finish_reason="stop",
                                message=ChatMessage(role="assistant", content="y" * 5_000))])
        run.from_answer(answer)
        assert await run.save()
        held = await store.get("resp_1")
        if background:  # the store is its only way out: failed, without the output
            assert held.status == "failed" and held.response["output"] == []
            assert held.response["error"]["code"] == "response_too_large"
        else:  # answered in full, not stored, and it says so
            snap = run.snapshot()
            assert snap["store"] is False and snap["output"][0]["content"][0]["text"] == "y" * 5000
            assert held is None
        store.close()

    asyncio.run(run())


def test_a_sqlite_file_from_before_owners_is_upgraded(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE responses (id TEXT PRIMARY KEY, created REAL NOT NULL, "
                "status TEXT NOT NULL, record BLOB NOT NULL)")
    record = StoredResponse({"id": "resp_old", "status": "completed"}, [], time.time())
    old.execute("INSERT INTO responses VALUES (?, ?, ?, ?)",
                ("resp_old", record.created, "completed", msgspec.json.encode(record)))
    old.commit()
    old.close()

    async def run() -> None:
        store = SQLiteResponseStore(str(path), 10, 60.0)
        assert (await store.get("resp_old")).status == "completed"  # no owner: keyless only
        assert await store.get("resp_old", owner_of("k1")) is None
        assert await store.put("resp_new", _record(1, owner=owner_of("k1")))
        assert (await store.get("resp_new", owner_of("k1"))).owner == owner_of("k1")
        store.close()

    asyncio.run(run())
