"""Grammar compilation is bounded: a time limit per compile (400 "grammar too complex" naming
the request's field), a bounded pool (503 + Retry-After beyond it), a compiled-grammar cache
bounded in bytes; the engine keeps serving everyone else throughout."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from fornax.runtime.config import StructuredOutputsConfig
from fornax.runtime.structured_output.grammar_cache import Failure, GrammarCache
from fornax.runtime.structured_output.grammar_pool import (
    GrammarBusy,
    GrammarCompilePool,
    GrammarTooComplex,
)
from helpers.api_server import ServerProcess, tiny_model_path

LIMIT_S = 0.2


def pathological(seed: int, n: int = 1500) -> dict:
    """A JSON schema of ~75 KB (under the size cap) that takes xgrammar about a second to compile,
    even for the tiny model's vocabulary: thousands of pattern alternatives."""
    return {"anyOf": [{"type": "string", "pattern": f"[a-z]{{1,{i % 50 + 1}}}q{seed}x{i}"}
                      for i in range(n)]}


# ---- the pool and the cache, in-process -------------------------------------------------------
def _pool(**kw) -> GrammarCompilePool:
    return GrammarCompilePool(StructuredOutputsConfig(**{
        "grammar_compile_timeout_s": 0.2, "grammar_compile_threads": 1,
        "grammar_max_pending_compiles": 2, **kw}))


def test_pool_time_limit_and_bounds() -> None:
    pool = _pool()
    release = threading.Event()
    stuck = pool.submit(lambda: release.wait(30))  # a compile that runs past its limit
    queued = pool.submit(lambda: "never runs in time")
    with pytest.raises(GrammarBusy):  # max_pending: one running + one queued
        pool.submit(lambda: None)
    with pytest.raises(GrammarTooComplex):
        stuck.wait()
    with pytest.raises(GrammarBusy):  # its thread stays taken: the queued one waited too long
        queued.wait()
    assert pool.num_pending == 1  # the runaway still counts until it ends
    release.set()
    deadline = time.monotonic() + 10
    while pool.num_pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.submit(lambda: 42).wait() == 42
    with pytest.raises(ValueError):
        pool.submit(lambda: int("x")).wait()
    pool.shutdown()


def test_compiles_queued_while_the_compiler_loads_are_not_busy() -> None:
    """xgrammar loads on the first constrained request (the compile thread's setup, ~2 s, more
    on a loaded machine): compiles queued behind that load wait for it outside their time limit
    too, instead of being answered 503 'busy' when the load outlasts the limit."""
    pool = _pool(grammar_max_pending_compiles=8)
    loaded = threading.Event()

    def load() -> None:  # the first setup loads, the others find it loaded
        if not loaded.is_set():
            time.sleep(5 * LIMIT_S)
            loaded.set()

    jobs = [pool.submit(lambda i=i: i, setup=load) for i in range(4)]
    assert [job.wait() for job in jobs] == [0, 1, 2, 3]
    # the wait for a thread still has its limit once the compiler is loaded
    release = threading.Event()
    stuck = pool.submit(lambda: release.wait(30), setup=load)
    queued = pool.submit(lambda: "never runs in time", setup=load)
    with pytest.raises(GrammarTooComplex):
        stuck.wait()
    with pytest.raises(GrammarBusy):
        queued.wait()
    release.set()
    pool.shutdown()


def test_pool_callbacks_run_before_waiters_wake() -> None:
    pool = _pool()
    seen: list[str] = []
    job = pool.submit(lambda: "g", on_done=lambda j: seen.append(f"first:{j.result}"))
    job.add_done_callback(lambda j: seen.append("second"))
    assert job.wait() == "g" and seen == ["first:g", "second"]
    job.add_done_callback(lambda j: seen.append("late"))  # already resolved: runs at once
    assert seen[-1] == "late"
    pool.shutdown()


class _Grammar:
    def __init__(self, size: int) -> None:
        self.memory_size_bytes = size


def test_cache_evicts_least_recently_used_by_bytes() -> None:
    cache = GrammarCache(max_bytes=1000, max_failures=2)
    for key in (b"a", b"b", b"c"):
        cache.put(key, _Grammar(300))
    assert cache.num_bytes == 900
    assert cache.get(b"a") is not None  # a is now the most recently used
    cache.put(b"d", _Grammar(300))
    assert cache.get(b"b") is None and cache.num_bytes == 900  # b went, not a
    cache.put(b"big", _Grammar(5000))  # larger than the whole budget: kept by nobody
    assert cache.get(b"big") is None and cache.num_bytes <= 1000
    for key in (b"x", b"y", b"z"):
        cache.put(key, Failure("no"))
    assert cache.num_failures == 2 and cache.get(b"x") is None
    assert isinstance(cache.get(b"z"), Failure)


def test_cache_keeps_pinned_grammars_until_released() -> None:
    cache = GrammarCache(max_bytes=1000, max_failures=4)
    cache.put(b"old", _Grammar(300))
    cache.put(b"held", _Grammar(800), pins=1)  # a request waits for it
    cache.put(b"newer", _Grammar(300))
    assert cache.get(b"old") is None and cache.get(b"newer") is None  # unpinned ones went
    assert cache.get(b"held") is not None and cache.num_bytes == 800
    cache.put(b"huge", _Grammar(5000), pins=1)  # pinned: over budget until released
    assert cache.get(b"huge") is not None and cache.num_bytes == 5800
    cache.unpin(b"huge")
    assert cache.get(b"huge") is None and cache.num_bytes == 800
    cache.unpin(b"held")
    cache.put(b"last", _Grammar(300))  # held is unpinned now: least recently used, evicted
    assert cache.get(b"held") is None and cache.num_bytes == 300


def test_manager_cache_bounded_in_bytes(tiny_model) -> None:
    from fornax.runtime.sampling.params import StructuredOutputsParams
    from fornax.runtime.structured_output.grammar import StructuredOutputManager

    path = tiny_model("llama")
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    manager = StructuredOutputManager(path, vocab, frozenset([2]),
                                      StructuredOutputsConfig(grammar_cache_bytes=150_000))
    sizes = []
    for i in range(12):
        grammar = manager.compile(StructuredOutputsParams(regex=f"[a-z]{{{i + 1},40}}x{i}"))
        sizes.append(grammar.memory_size_bytes)
        assert manager.cache.num_bytes <= 150_000
    assert sum(sizes) > 150_000 and 0 < len(manager.cache) < 12  # something was evicted
    again = manager.compile(StructuredOutputsParams(regex="[a-z]{12,40}x11"))  # the newest
    assert again.memory_size_bytes == sizes[-1]
    manager.shutdown()


# ---- a real server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    proc = ServerProcess(str(tiny_model_path("llama")), "--max-model-len", "512",
                         "--served-model-name", "tiny", "--grammar-compile-timeout", str(LIMIT_S),
                         "--grammar-compile-threads", "2", "--grammar-max-pending-compiles", "3"
                         ).wait_ready()
    yield proc
    pid = proc.engine_pid()
    assert proc.stop() == 0, proc.log()  # runaway compiles do not spoil the exit
    assert not os.path.exists(f"/proc/{pid}/status") or "zombie" in open(
        f"/proc/{pid}/status").read()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def _complete(http, **body) -> httpx.Response:
    return http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 8,
                                              **body})


def _too_complex(resp: httpx.Response, param: str) -> None:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert "grammar too complex" in err["message"] and err["param"] == param, err


@pytest.mark.slow
def test_too_complex_is_400_while_others_are_served(server, http) -> None:
    engine = server.engine_pid()
    schema = pathological(1)
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}
    with ThreadPoolExecutor(4) as pool:
        slow = pool.submit(_complete, http, response_format=fmt)
        plain = pool.submit(_complete, http)
        regex = pool.submit(_complete, http, structured_outputs={"regex": "[0-9]{3}"})
        _too_complex(slow.result(), "response_format")
        assert plain.result().status_code == 200, plain.result().text
        assert regex.result().status_code == 200, regex.result().text
    assert len(regex.result().json()["choices"][0]["text"]) == 3
    # the same spec again, from another field: refused at once (remembered), naming that field
    _too_complex(_complete(http, guided_json=schema), "guided_json")
    chat = http.post("/v1/chat/completions", json={
        "model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
        "structured_outputs": {"json": schema}})
    _too_complex(chat, "structured_outputs.json")
    assert http.get("/health").status_code == 200 and server.engine_pid() == engine


@pytest.mark.slow
def test_full_pool_is_503_with_retry_after_and_recovers(server, http) -> None:
    engine = server.engine_pid()
    with ThreadPoolExecutor(5) as pool:
        resps = list(pool.map(lambda i: _complete(
            http, structured_outputs={"json": pathological(100 + i)}), range(5)))
    statuses = sorted(r.status_code for r in resps)
    assert set(statuses) <= {400, 503} and 400 in statuses and 503 in statuses, statuses
    for resp in resps:
        if resp.status_code == 503:
            assert resp.headers.get("retry-after") and resp.json()["error"]["message"]
        else:
            _too_complex(resp, "structured_outputs.json")
    assert _complete(http).status_code == 200  # unconstrained requests never wait on grammars
    deadline = time.monotonic() + 120  # the runaway compiles end; constrained ones work again
    while True:
        resp = _complete(http, structured_outputs={"regex": "[a-c]{4}"})
        if resp.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert resp.status_code == 200, resp.text
    assert http.get("/health").status_code == 200 and server.engine_pid() == engine


@pytest.mark.slow
def test_abort_while_compiling_leaves_the_engine_clean(server, http) -> None:
    schema = pathological(7)
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 8, "stream": True,
            "structured_outputs": {"json": schema}}
    try:  # the client gives up while the grammar still compiles
        http.post("/v1/completions", json=body, timeout=0.05)
    except httpx.TimeoutException:
        pass
    time.sleep(LIMIT_S * 2)
    assert _complete(http).status_code == 200
    deadline = time.monotonic() + 30
    while True:  # nothing left running or waiting in the engine
        load = http.get("/load")
        if load.status_code != 200 or load.json().get("server_load", 0) == 0:
            break
        assert time.monotonic() < deadline, load.text
        time.sleep(0.2)
