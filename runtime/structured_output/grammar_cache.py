"""The compiled-grammar cache: LRU bounded in bytes, failures kept in a small LRU of their own,
entries pinned while an admitted request still needs them (engine-core process)."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

logger = logging.getLogger(__name__)

PIN_TTL_S = 60.0  # a pin whose request never reached its matcher (refused later) lapses
MAX_FAILURE_CHARS = 1000  # a cached failure keeps this much of the compiler's message


def digest(key: str) -> bytes:
    """Cache keys are digests: a spec of 256 KB must not be kept once per entry."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class Failure:
    """A spec that cannot compile (or compiled too slowly): refused again at once."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message[:MAX_FAILURE_CHARS]


class GrammarCache:
    """Compiled grammars by spec digest, least recently used dropped first once their summed
    `memory_size_bytes` passes `max_bytes`; failures in a separate LRU of `max_failures`.

    An entry pinned by `pin` (a request holds it between compile and admission) is not evicted
    until `unpin` or PIN_TTL_S, so the busy loop always finds what the input side compiled; the
    cache may exceed its budget by the pinned entries until they are released.
    """

    def __init__(self, max_bytes: int, max_failures: int) -> None:
        self.max_bytes = max_bytes
        self.max_failures = max_failures
        self._lock = threading.Lock()
        self._compiled: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()  # -> (grammar, bytes)
        self._failures: OrderedDict[bytes, Failure] = OrderedDict()
        self._pins: dict[bytes, tuple[int, float]] = {}  # -> (count, time of the last pin)
        self.num_bytes = 0

    def get(self, key: bytes, pin: bool = False) -> Any | Failure | None:
        """The grammar or failure cached for `key` (None on a miss); `pin` pins a grammar."""
        with self._lock:
            hit = self._compiled.get(key)
            if hit is not None:
                self._compiled.move_to_end(key)
                if pin:
                    self._pin(key, 1)
                return hit[0]
            failure = self._failures.get(key)
            if failure is not None:
                self._failures.move_to_end(key)
            return failure

    def put(self, key: bytes, value: Any | Failure, pins: int = 0) -> None:
        """Cache a grammar (pinned `pins` times, before any eviction) or a failure."""
        with self._lock:
            if isinstance(value, Failure):
                self._failures[key] = value
                self._failures.move_to_end(key)
                while len(self._failures) > self.max_failures:
                    self._failures.popitem(last=False)
                return
            old = self._compiled.pop(key, None)
            if old is not None:
                self.num_bytes -= old[1]
            size = _size_of(value)
            self._compiled[key] = (value, size)
            self.num_bytes += size
            if pins > 0:
                self._pin(key, pins)
            self._evict()

    def _pin(self, key: bytes, count: int) -> None:
        held, _ = self._pins.get(key, (0, 0.0))
        self._pins[key] = (held + count, time.monotonic())

    def unpin(self, key: bytes) -> None:
        with self._lock:
            if key not in self._pins:
                return
            held, at = self._pins[key]
            if held <= 1:
                self._pins.pop(key, None)
                self._evict()
            else:
                self._pins[key] = (held - 1, at)

    def _evict(self) -> None:
        """Drop least recently used unpinned grammars until within budget (lock held)."""
        excess = self.num_bytes - self.max_bytes
        if excess <= 0:
            return
        now = time.monotonic()
        victims = []
        for key, (_, size) in self._compiled.items():
            if excess <= 0:
                break
            pin = self._pins.get(key)
            if pin is not None and now - pin[1] < PIN_TTL_S:
                continue
            victims.append(key)
            excess -= size
        for key in victims:
            self._pins.pop(key, None)
            self.num_bytes -= self._compiled.pop(key)[1]

    def __len__(self) -> int:
        return len(self._compiled)

    @property
    def num_failures(self) -> int:
        return len(self._failures)

    def clear(self) -> None:
        with self._lock:
            self._compiled.clear()
            self._failures.clear()
            self._pins.clear()
            self.num_bytes = 0


def _size_of(grammar: Any) -> int:
    try:
        return max(int(grammar.memory_size_bytes), 1)
    except (AttributeError, TypeError, ValueError):  # a stand-in without a size (tests)
        return 1
