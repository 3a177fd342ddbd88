"""The many-model server's model manager and its worker client, with fake engines: a request
that stops waiting never leaves its model busy; an unload answers the requests waiting on it;
a dead engine's watcher never restarts an unloaded model."""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from fornax.api.engine.launcher import EngineStartError
from fornax.api.engine.launcher_group import EngineGroup
from fornax.api.engine.manager_client import ManagerClient
from fornax.api.engine.model_manager import LOADED, ModelManager
from fornax.api.server.errors import APIError
from fornax.runtime.engine.messages import ModelCommand


class FakeLauncher:
    """Starts when `go` is set (a load that takes as long as the test wants)."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.stopping = False
        self.starts = 0

    def start(self) -> None:
        self.go.wait(30)
        self.starts += 1

    def stop(self, timeout_s: float) -> int:
        self.stopping = True
        return 0


class FakeGroup:
    def __init__(self, n: int) -> None:
        self.names = [f"m{i}" for i in range(n)]
        self.launchers = [FakeLauncher() for _ in range(n)]
        self.ipc_dir = tempfile.mkdtemp(prefix="fx-", dir="/tmp")
        self.drain_timeout_s = 1.0

    def supervise(self, i: int) -> None:
        pass

    def note_footprint(self, i: int) -> int:
        return 0

    def unload(self, i: int, timeout_s: float) -> int:
        return self.launchers[i].stop(timeout_s)


def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture
def manager() -> Any:
    group = FakeGroup(2)
    mgr = ModelManager(group, [0.0, 0.0], 1, [True, False])  # type: ignore[arg-type]
    mgr.start()
    yield mgr
    for launcher in group.launchers:
        launcher.go.set()
    mgr.stop()


async def with_client(mgr: ModelManager, body: Callable[[ManagerClient], Any]) -> None:
    client = ManagerClient(mgr.address)
    await client.start()
    try:
        await body(client)
        await asyncio.sleep(0.3)  # let the withdrawals reach the manager
    finally:
        await client.close()


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_given_up_ensure_leaves_model_idle(manager: ModelManager, how: str) -> None:
    async def body(client: ManagerClient) -> None:
        if how == "timeout":
            with pytest.raises(APIError) as err:
                await client.ask("ensure", 1, timeout_s=0.3)
            assert err.value.status == 503
        else:
            task = asyncio.ensure_future(client.ask("ensure", 1, timeout_s=60))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(with_client(manager, body))
    until(lambda: not manager.waiters[1], "the given-up waiter is dropped")
    manager.group.launchers[1].go.set()  # type: ignore[attr-defined]
    until(lambda: manager.states[1] == LOADED, "model 1 loads")
    time.sleep(0.3)
    assert manager.busy == [0, 0]


def test_grant_crossing_withdrawal_is_ended(manager: ModelManager) -> None:
    """A grant that arrives after the asker gave up (the cancel crossed it) is ended at once."""
    async def body(client: ManagerClient) -> None:
        client._abandoned[7] = 0  # as if ensure #7 had been withdrawn while its grant flew
        await client.dealer.send(client._encoder.encode(ModelCommand(7, "ensure", 0)))
        await asyncio.sleep(0.3)
        assert not client._abandoned

    asyncio.run(with_client(manager, body))
    until(lambda: manager.busy[0] == 0, "the crossed grant is ended")


def test_unload_answers_the_waiters_of_a_pending_model(manager: ModelManager) -> None:
    """Model 0 is loaded and busy (--max-loaded-models 1), so model 1 waits to load; an unload
    of model 1 answers its waiters at once with an error naming the unload."""
    async def body(client: ManagerClient) -> None:
        assert not (await client.ask("ensure", 0)).error  # model 0 busy: model 1 stays pending
        waiting = asyncio.ensure_future(client.ask("ensure", 1, timeout_s=60))
        await asyncio.sleep(0.3)
        assert not (await client.ask("unload", 1)).error
        reply = await asyncio.wait_for(waiting, 5)
        assert "m1 was unloaded" in reply.error and "unload" in reply.error
        await client.tell("end", 0)

    asyncio.run(with_client(manager, body))
    assert manager.waiters == [[], []] and manager.busy == [0, 0]


class FakeProc:
    """An engine process whose death the watcher sees when the test says so."""

    def __init__(self) -> None:
        self.dead = threading.Event()

    def wait(self) -> int:
        self.dead.wait(30)
        return -9


class CrashingLauncher:
    """Counts its starts; each start fails while `fail` is set."""

    def __init__(self) -> None:
        self.stopping = False
        self.proc: FakeProc | None = FakeProc()
        self.starts = 0
        self.fail = False

    def start(self) -> None:
        self.starts += 1
        if self.fail:
            raise EngineStartError("no")
        self.proc = FakeProc()

    def stop(self, timeout_s: float) -> int:
        self.stopping = True
        return 0


def fake_group() -> tuple[EngineGroup, CrashingLauncher]:
    group = EngineGroup.__new__(EngineGroup)
    launcher = CrashingLauncher()
    group.names, group.launchers, group.stopping = ["m0"], [launcher], False  # type: ignore[list-item]
    group.restarts, group.generations, group.drain_timeout_s = [0], [0], 1.0
    return group, launcher


def test_unload_during_restart_backoff_ends_the_restarts() -> None:
    group, launcher = fake_group()
    launcher.fail = True
    group.supervise(0)
    assert launcher.proc is not None
    launcher.proc.dead.set()  # a crash: the restart fails, then waits 1 s before the next try
    until(lambda: launcher.starts == 1, "the watcher tries a restart")
    group.unload(0, 1.0)
    time.sleep(1.5)
    assert launcher.starts == 1


def test_old_watcher_after_unload_and_reload_starts_nothing() -> None:
    group, launcher = fake_group()
    old = launcher.proc
    assert old is not None
    group.supervise(0)
    group.unload(0, 1.0)
    launcher.stopping = False  # the model manager loads it again before the old watcher wakes
    launcher.start()
    group.supervise(0)
    old.dead.set()  # the first engine's exit reaches its watcher only now
    time.sleep(0.5)
    assert launcher.starts == 1 and group.restarts == [0]
    assert launcher.proc is not None
    launcher.proc.dead.set()  # the new engine crashes: its watcher does restart it
    until(lambda: launcher.starts == 2, "the current watcher restarts a crashed engine")
