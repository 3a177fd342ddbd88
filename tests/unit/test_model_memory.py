"""The model manager's memory budget and idle sleep, with fake engines whose resident memory the
test sets (no server): a load stops the least recently used idle model until the new one fits,
a model larger than the whole budget is refused at once (no Retry-After), an idle model with
idle_action sleep is put to sleep and woken by its next request; a worker's load queue is
bounded (then 503 + Retry-After); and --max-loaded-memory's bounds (fuzzed)."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fornax.api.engine.engine_control import process_memory
from fornax.api.engine.manager_client import ManagerClient
from fornax.api.engine.model_manager import ASLEEP, LOADED, UNLOADED, ModelManager
from fornax.api.server.args import memory_budget
from fornax.runtime.engine.messages import AdminResult
from fornax.runtime.limits import MAX_LOADED_MEMORY_BYTES, MIN_LOADED_MEMORY_BYTES
from helpers.fuzzing.values import edge_text

GIB = 2**30


class FakeEngines:
    """Engines that start at once; each holds `size[i]` bytes while running (half asleep)."""

    def __init__(self, sizes: list[int]) -> None:
        self.names = [f"m{i}" for i in range(len(sizes))]
        self.size = sizes
        self.running = [False] * len(sizes)
        self.asleep = [False] * len(sizes)
        self.footprints = list(sizes)
        self.launchers = [self._launcher(i) for i in range(len(sizes))]
        self.ipc_dir = tempfile.mkdtemp(prefix="fx-", dir="/tmp")
        self.drain_timeout_s = 0.1
        self.commands: list[tuple[int, str]] = []
        self.lock = threading.Lock()
        self.most = 0  # the largest total resident memory seen

    def _launcher(self, i: int) -> Any:
        engines = self

        class Launcher:
            stopping = False

            def start(self) -> None:
                engines.running[i] = True
                engines.asleep[i] = False
                engines.note_most()

        return Launcher()

    def note_most(self) -> None:
        with self.lock:
            self.most = max(self.most, sum(self.memory(i)[0] for i in range(len(self.size))))

    def memory(self, i: int) -> tuple[int, int]:
        if not self.running[i]:
            return 0, 0
        rss = self.size[i] // 2 if self.asleep[i] else self.size[i]
        return rss, self.size[i]

    def note_footprint(self, i: int) -> int:
        return self.footprints[i]

    def supervise(self, i: int) -> None:
        pass

    def unload(self, i: int, timeout_s: float) -> int:
        self.running[i] = False
        return 0

    def admin(self, i: int, command: str, level: int = 1) -> AdminResult:
        self.commands.append((i, command))
        self.asleep[i] = command == "sleep"
        self.note_most()
        return AdminResult(0, 200, "", self.asleep[i])


def hold(engines: FakeEngines, command: str, release: threading.Event) -> None:
    """The engines' admin `command` (sleep, wake_up) waits until `release` is set (10 s at most)."""
    plain_admin = engines.admin

    def slow_admin(i: int, given: str, level: int = 1) -> AdminResult:
        if given == command:
            release.wait(10)
        return plain_admin(i, given, level)

    engines.admin = slow_admin  # type: ignore[method-assign]


def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def manager_of(engines: FakeEngines, budget: int, loaded: list[bool],
               idle: list[float] | None = None, actions: list[str] | None = None) -> ModelManager:
    for i, on in enumerate(loaded):
        engines.running[i] = on
    n = len(loaded)
    mgr = ModelManager(engines, idle or [0.0] * n, 0, loaded, budget, actions)  # type: ignore[arg-type]
    mgr.start()
    return mgr


def run(mgr: ModelManager, body: Callable[[ManagerClient], Any]) -> None:
    async def main() -> None:
        client = ManagerClient(mgr.address)
        await client.start()
        try:
            await body(client)
        finally:
            await client.close()

    try:
        asyncio.run(main())
    finally:
        mgr.stop()


def test_a_load_stops_least_recently_used_idle_models_until_it_fits() -> None:
    engines = FakeEngines([GIB, GIB, 2 * GIB])
    mgr = manager_of(engines, 3 * GIB, [True, True, False])

    async def body(client: ManagerClient) -> None:
        await client.tell("end", 1)  # model 1 used last: model 0 is the one to go
        await asyncio.sleep(0.1)
        assert not (await client.ask("ensure", 2)).error
        assert mgr.states == [UNLOADED, LOADED, LOADED]
        await client.tell("end", 2)
        for model in (0, 2, 1, 0):  # each load makes room under the budget
            assert not (await client.ask("ensure", model)).error
            await client.tell("end", model)
        assert engines.most <= 3 * GIB

    run(mgr, body)


def test_a_model_larger_than_the_budget_is_refused_at_once() -> None:
    engines = FakeEngines([GIB, 4 * GIB])
    mgr = manager_of(engines, 3 * GIB, [True, False])

    async def body(client: ManagerClient) -> None:
        reply = await client.ask("ensure", 1, timeout_s=5)
        assert reply.lasting and "m1 needs 4.00 GiB" in reply.error
        assert "--max-loaded-memory 3.00 GiB" in reply.error
        assert mgr.states == [LOADED, UNLOADED]  # nothing was stopped for it

    run(mgr, body)


def test_an_idle_model_sleeps_and_its_next_request_wakes_it() -> None:
    engines = FakeEngines([2 * GIB, GIB])
    mgr = manager_of(engines, 0, [True, True], idle=[0.3, 0.3], actions=["sleep", "stop"])

    async def body(client: ManagerClient) -> None:
        deadline = time.monotonic() + 10
        while mgr.states != [ASLEEP, UNLOADED]:  # model 0 sleeps, model 1 stops
            assert time.monotonic() < deadline, mgr.states
            await asyncio.sleep(0.05)
        assert engines.memory(0)[0] == GIB and engines.running[0]
        assert not (await client.ask("ensure", 0)).error
        assert mgr.states[0] == LOADED and engines.memory(0)[0] == 2 * GIB
        assert engines.commands == [(0, "sleep"), (0, "wake_up")]
        await client.tell("end", 0)

    run(mgr, body)


def test_waking_counts_against_the_budget() -> None:
    """An asleep model holds half its size; waking it needs its whole footprint: the other
    idle model is stopped first."""
    engines = FakeEngines([2 * GIB, 2 * GIB])
    mgr = manager_of(engines, 3 * GIB, [True, False], idle=[0.2, 0.0], actions=["sleep", "stop"])

    async def body(client: ManagerClient) -> None:
        until(lambda: mgr.states[0] == ASLEEP, "model 0 sleeps")
        assert not (await client.ask("ensure", 1)).error  # 1 GiB asleep + 2 GiB fits
        assert mgr.states == [ASLEEP, LOADED]
        await client.tell("end", 1)
        await asyncio.sleep(0.1)
        assert not (await client.ask("ensure", 0)).error  # 1 + 2 + 2 does not: model 1 stops
        assert mgr.states == [LOADED, UNLOADED]
        assert engines.most <= 3 * GIB

    run(mgr, body)


def test_memory_budget_bounds() -> None:
    assert memory_budget("6GiB") == memory_budget("6G") == 6 * GIB
    assert memory_budget("6000M") == 6000 * 2**20 and memory_budget("0") == 0
    for bad in ("6", "63MiB", "2PiB", "-1G", "lots", "1e9", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            memory_budget(bad)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(edge_text(), st.integers().map(str),
                      st.from_regex(r"\A-?\d{0,20}(\.\d{0,3})?\s?[kKmMgGtTpP]?i?[bB]?\Z")))
def test_fuzzed_memory_budget_is_in_bounds_or_refused(text: str) -> None:
    try:
        value = memory_budget(text)
    except argparse.ArgumentTypeError:
        return
    assert value == 0 or MIN_LOADED_MEMORY_BYTES <= value <= MAX_LOADED_MEMORY_BYTES


def test_process_memory_reads_this_process() -> None:
    import os

    rss, peak = process_memory(os.getpid())
    assert 0 < rss <= peak
    assert process_memory(2**22 + 12345) == (0, 0)  # no such process


def test_a_sleep_or_wake_up_sent_to_an_engine_that_died_ends_at_once() -> None:
    """The manager's admin link gives up when the engine process is gone, instead of holding
    the model in sleeping / waking (and its requests waiting) for the command's whole timeout."""
    from fornax.api.engine.engine_control import EngineLink

    with tempfile.TemporaryDirectory() as ipc_dir:
        link = EngineLink(ipc_dir, 2**22 + 12345)  # no engine binds its input: no answer
        try:
            began = time.monotonic()
            result = link.admin("wake_up", timeout_s=60.0, alive=lambda: False)
            assert result.status == 503 and "exited" in result.message
            assert time.monotonic() - began < 30.0
        finally:
            link.close()


def _entries(*argv: str):
    from fornax.api.cli import build_parser
    from fornax.api.server.argv import normalize_serve_argv, subparser
    from fornax.api.server.model_entries import model_entries

    parser = build_parser()
    serve = subparser(parser, "serve")
    args = parser.parse_args(["serve", *normalize_serve_argv(list(argv), serve)])
    return args, model_entries(args, serve)


def test_budget_and_idle_action_flags_in_a_config_file(tmp_path) -> None:
    config = tmp_path / "many.yaml"
    config.write_text("max_loaded_memory: 6GiB\nidle_action: sleep\nmodels:\n"
                      "  - model: /m/chat\n    idle_timeout: 30\n"
                      "  - model: /m/other\n    idle_action: stop\n")
    args, entries = _entries("--config", str(config))
    assert args.max_loaded_memory == 6 * GIB
    assert [(e.idle_action, e.idle_timeout) for e in entries] == [("sleep", 30.0), ("stop", 0.0)]


def test_bad_budget_or_idle_action_stops_the_start() -> None:
    from fornax.runtime.errors import ConfigError

    for argv in (["--models", "/a", "/b", "--max-loaded-memory", "5"],
                 ["--models", "/a", "/b", "--idle-action", "nap"]):
        with pytest.raises(SystemExit) as info:
            _entries(*argv)
        assert info.value.code == 2
    with pytest.raises(ConfigError, match="models.0. .*refused"):
        _entries("--models", '{"model": "/a", "idle_action": "nap"}')
    with pytest.raises(ConfigError, match="--max-loaded-memory"):
        _entries("/a", "--max-loaded-memory", "1GiB")  # one model: nothing to budget


def test_requests_beyond_the_load_queue_get_503_with_retry_after(monkeypatch) -> None:
    """While a model loads, each API worker queues at most MAX_LOAD_WAITERS requests for it;
    the next gets 503 + Retry-After at once, and the queued ones are served once it loads."""
    from types import SimpleNamespace

    from fornax.api.server import model_set
    from fornax.api.server.errors import APIError
    from fornax.runtime.engine.messages import ModelStates

    monkeypatch.setattr(model_set, "MAX_LOAD_WAITERS", 2)
    loaded = asyncio.Event()

    class Manager:
        async def ask(self, op: str, model: int = -1, timeout_s: float = 30.0) -> ModelStates:
            await loaded.wait()
            return ModelStates(0, ["loaded"])

    state = SimpleNamespace(model_name="slow", engine=SimpleNamespace(dead=False))
    models = model_set.ModelSet.__new__(model_set.ModelSet)
    models.states, models.manager = [state], Manager()  # type: ignore[list-item,assignment]
    models._waiting, models._leases = [0], {}

    def request() -> Any:
        return SimpleNamespace(path="/v1/chat/completions", state=state)

    async def main() -> None:
        queued = [asyncio.ensure_future(models.acquire(request(), None)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(APIError) as info:
            await asyncio.wait_for(models.acquire(request(), None), 5)  # not queued
        assert info.value.status == 503 and info.value.headers == {"retry-after": "5"}
        assert "2 requests already wait for slow" in info.value.message
        loaded.set()
        await asyncio.gather(*queued)
        assert models._waiting == [0] and len(models._leases) == 2

    asyncio.run(main())


def test_unload_while_a_model_falls_asleep_unloads_it() -> None:
    """POST unload that comes while the model's engine is going to sleep is not lost: the model
    is stopped once the sleep is over (it was answered as done, but the model stayed asleep)."""
    engines = FakeEngines([2 * GIB])
    asleep = threading.Event()
    hold(engines, "sleep", asleep)
    mgr = manager_of(engines, 0, [True], idle=[0.2], actions=["sleep"])

    async def body(client: ManagerClient) -> None:
        until(lambda: mgr.states[0] == "sleeping", "model 0 falls asleep")
        assert not (await client.ask("unload", 0)).error
        asleep.set()
        deadline = time.monotonic() + 10
        while mgr.states[0] != UNLOADED:
            assert time.monotonic() < deadline, mgr.states
            await asyncio.sleep(0.05)
        assert not engines.running[0]

    run(mgr, body)


@pytest.mark.parametrize("doing", ["loading", "waking"])
def test_unload_while_a_model_loads_or_wakes_unloads_it_and_refuses_its_waiters(doing) -> None:
    """POST unload while the model loads (or wakes up) is not lost: it answers "unloading", the
    request waiting for that load gets its 503 naming the model at once, the model is stopped as
    soon as the load is over, and a later request loads it again."""
    engines = FakeEngines([GIB])
    release = threading.Event()
    if doing == "loading":
        plain_start = engines.launchers[0].start

        def slow_start() -> None:
            release.wait(10)
            plain_start()

        engines.launchers[0].start = slow_start
    else:
        hold(engines, "wake_up", release)
    mgr = manager_of(engines, 0, [doing == "waking"], idle=[0.2], actions=["sleep"])

    async def body(client: ManagerClient) -> None:
        if doing == "waking":
            until(lambda: mgr.states[0] == ASLEEP, "model 0 falls asleep")
        waiting = asyncio.ensure_future(client.ask("ensure", 0, timeout_s=10))
        while mgr.states[0] not in ("loading", "waking"):
            await asyncio.sleep(0.02)
        answer = await client.ask("unload", 0)
        assert not answer.error and answer.states == ["unloading"], answer
        refused = await asyncio.wait_for(waiting, 5)  # at once, not when the load is over
        assert f"m0 was unloaded (POST /v1/models/{{id}}/unload) while it was " \
               f"{'loading' if doing == 'loading' else 'waking up'}" in refused.error, refused
        release.set()
        deadline = time.monotonic() + 10
        while mgr.states[0] != UNLOADED:
            assert time.monotonic() < deadline, mgr.states
            await asyncio.sleep(0.05)
        assert not engines.running[0] and mgr.busy == [0]
        assert not (await client.ask("ensure", 0, timeout_s=10)).error  # loaded again
        assert mgr.states[0] == LOADED
        await client.tell("end", 0)

    run(mgr, body)
