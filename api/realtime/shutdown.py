"""Open realtime sessions get a proper close when their API worker is told to stop (API workers).

Granian cuts a worker's WebSocket connections, without a close frame, as soon as the worker gets
its stop signal (SIGTERM or SIGINT: from the server once the engine has drained, or from Ctrl-C,
systemd or a Ray replica to the whole process group), and only then runs the app's lifespan
shutdown: too late to say goodbye. `install_worker_hook` (called by the app factory, in the
worker, before Granian sets up the worker's signals) puts a step first: each open session lets
the decode it has in flight finish (the engine's drain bounds it), sends its protocol's `error`
event (code `server_shutting_down`) and closes with 1001 (going away); then Granian stops as
before. A worker with no open session, or a second signal, stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

logger = logging.getLogger(__name__)

GOING_AWAY_WAIT_S = 5.0  # at most this long for a decode in flight (the default drain)
CLOSE_GOING_AWAY = 1001


class Closable(Protocol):
    async def going_away(self, wait_s: float) -> None: ...


class _Sessions:
    """This worker's open sessions and whether it was told to stop (one event loop)."""

    def __init__(self) -> None:
        self.open: set[Closable] = set()
        self.stopping = False


SESSIONS = _Sessions()


async def close_all(wait_s: float = GOING_AWAY_WAIT_S) -> int:
    """Say goodbye to every open session (concurrently, bounded); how many there were."""
    SESSIONS.stopping = True
    sessions = list(SESSIONS.open)
    if sessions:
        logger.info("stopping: closing %d realtime session(s) (1001 going away)", len(sessions))
        tasks = [asyncio.ensure_future(s.going_away(wait_s)) for s in sessions]
        done, pending = await asyncio.wait(tasks, timeout=wait_s + 2.0)
        for task in pending:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                logger.debug("closing a realtime session failed: %r", task.exception())
    return len(sessions)


async def wait_idle(busy: Callable[[], bool], wait_s: float) -> None:
    """Wait until `busy()` is false, at most `wait_s`."""
    deadline = time.monotonic() + wait_s
    while busy() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def install_worker_hook() -> None:
    """Wrap Granian's worker signal setup so that a stop signal closes the realtime sessions
    first. A Granian without that function keeps its own behaviour (sessions are cut)."""
    try:
        from granian import _signals
    except ImportError:
        return
    original = getattr(_signals, "set_loop_signals", None)
    if original is None or getattr(original, "fornax_realtime_hook", False):
        return

    def set_loop_signals(loop: asyncio.AbstractEventLoop) -> Any:
        stop = original(loop)  # Granian's worker stop event (its Rust side waits on it)
        state = {"signalled": False}

        def on_signal(signum: int, frame: object) -> None:
            if state["signalled"] or not SESSIONS.open:  # nothing to close, or "now"
                stop.set()
                return
            state["signalled"] = True
            task = loop.create_task(close_all())
            task.add_done_callback(lambda _t: stop.set())

        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal, sig, None)
        except (NotImplementedError, RuntimeError) as exc:  # Granian's handlers stay
            logger.debug("realtime shutdown hook not installed: %s", exc)
        return stop

    set_loop_signals.fornax_realtime_hook = True  # type: ignore[attr-defined]
    _signals.set_loop_signals = set_loop_signals
