"""Finals first: the realtime sessions of one API worker share a gate for their partial decodes (API workers).

A session's final decode (an utterance ended, or a speculative one at a pause) goes to the engine
at once and holds the gate shut meanwhile; a partial decode waits until no final is in flight and
fewer than `max_partials` partial decodes of any session are. Waiters go in arrival order, so
under load every session's partials come less often (each covers all its audio so far) instead of
the engine's queue growing, and an ended utterance never waits behind partial encodes that
started after it. With one session nothing waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator

logger = logging.getLogger(__name__)

MAX_PARTIALS_IN_FLIGHT = 2  # partial decodes in the engine at once, all sessions together


class DecodeGate:
    """Counts finals and partial decodes in flight; partial ones wait their turn."""

    def __init__(self, max_partials: int = MAX_PARTIALS_IN_FLIGHT) -> None:
        self.max_partials = max_partials
        self.finals = 0
        self.partials = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _open(self) -> bool:
        return self.finals == 0 and self.partials < self.max_partials

    def _wake(self) -> None:
        """Let the oldest waiters through while the gate is open."""
        while self._waiters and self._open():
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                self.partials += 1  # taken on the waiter's behalf: no one overtakes it

    @contextlib.asynccontextmanager
    async def partial(self) -> AsyncIterator[None]:
        """Hold a partial-decode slot (waits while finals run or the slots are taken)."""
        if self._open() and not self._waiters:
            self.partials += 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release_partial()  # granted as it was cancelled: give it back
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(fut)
                raise
        try:
            yield
        finally:
            self._release_partial()

    def _release_partial(self) -> None:
        self.partials -= 1
        self._wake()

    @contextlib.asynccontextmanager
    async def final(self) -> AsyncIterator[None]:
        """A final decode in flight: no partial decode starts meanwhile."""
        self.finals += 1
        try:
            yield
        finally:
            self.finals -= 1
            self._wake()


GATE = DecodeGate()  # this API worker's (one event loop per worker process)
