"""Grammar compiles on a fixed set of threads with a bounded queue, a time limit per compile and
a limit on the wait for a thread (engine-core process).

xgrammar's compile is C++ that releases the GIL (the busy loop keeps running beside it) but
cannot be interrupted: a compile past its limit is answered at once ("too complex") while its
thread runs on until xgrammar returns, still counted against the pool. So at most `num_threads`
compiles ever run, at most `max_pending` wait or run, and a job that waits longer than
`queue_wait_s` for a thread is answered "busy" — a stream of pathological grammars costs those
threads and a 503 for later compiles, never the engine's loop or an unbounded pile of threads.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrammarLimits:
    """Operators tune these with environment variables (the engine-core process reads them)."""

    time_limit_s: float = 10.0  # FORNAX_GRAMMAR_COMPILE_TIMEOUT_S: one compile, then 400
    queue_wait_s: float = 10.0  # FORNAX_GRAMMAR_QUEUE_WAIT_S: wait for a thread, then 503
    num_threads: int = 2  # FORNAX_GRAMMAR_COMPILE_THREADS
    max_pending: int = 64  # FORNAX_GRAMMAR_MAX_PENDING: compiles queued or running, then 503
    cache_bytes: int = 512 * 2**20  # FORNAX_GRAMMAR_CACHE_MB: compiled grammars kept
    max_failures: int = 1024  # FORNAX_GRAMMAR_MAX_FAILURES: refused specs remembered
    max_waiting_requests: int = 4096  # FORNAX_GRAMMAR_MAX_WAITING: requests held for compiles

    @classmethod
    def from_env(cls) -> GrammarLimits:
        d = cls()
        return cls(
            time_limit_s=_env_float("FORNAX_GRAMMAR_COMPILE_TIMEOUT_S", d.time_limit_s),
            queue_wait_s=_env_float("FORNAX_GRAMMAR_QUEUE_WAIT_S", d.queue_wait_s),
            num_threads=int(_env_float("FORNAX_GRAMMAR_COMPILE_THREADS", d.num_threads)),
            max_pending=int(_env_float("FORNAX_GRAMMAR_MAX_PENDING", d.max_pending)),
            cache_bytes=int(_env_float("FORNAX_GRAMMAR_CACHE_MB", d.cache_bytes / 2**20)
                            * 2**20),
            max_failures=int(_env_float("FORNAX_GRAMMAR_MAX_FAILURES", d.max_failures)),
            max_waiting_requests=int(_env_float("FORNAX_GRAMMAR_MAX_WAITING",
                                                d.max_waiting_requests)))


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        logger.warning("ignoring %s=%r (not a number); using %s", name, raw, default)
        return default
    if not value > 0:
        logger.warning("ignoring %s=%r (must be positive); using %s", name, raw, default)
        return default
    return value


_POOLS: weakref.WeakSet[GrammarCompilePool] = weakref.WeakSet()


def num_compiling() -> int:
    """Compiles still inside xgrammar in this process (including those past their limit)."""
    return sum(len(pool._running) for pool in list(_POOLS))


def exit_process(code: int) -> None:
    """Exit with `code`. A compile thread that returns from xgrammar into an interpreter that is
    shutting down aborts the process (std::terminate), so with compiles still running the
    process ends at once (logs flushed) instead of running the interpreter's shutdown."""
    if num_compiling():
        logger.warning("exiting with %d grammar compiles still running", num_compiling())
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _wait_at_exit() -> None:
    """Offline use: let runaway compiles end before the interpreter shuts down (see above)."""
    pending = num_compiling()
    if pending:
        logger.warning("waiting for %d grammar compiles past their time limit to end", pending)
    for pool in list(_POOLS):
        with pool._cond:
            while pool._running:
                pool._cond.wait(1.0)


class GrammarTooComplex(Exception):
    """The compile ran past the time limit."""


class GrammarBusy(Exception):
    """No compile thread (or queue slot) was free in time."""


class CompileJob:
    """One compile: resolved once, by its thread or by the watchdog, whichever comes first."""

    def __init__(self, fn: Callable[[], Any], setup: Callable[[], Any] | None = None) -> None:
        self.fn = fn
        self.setup = setup  # runs before the clock starts (loading the compiler itself)
        self.queued_at = time.monotonic()
        self.started_at: float | None = None
        self.resolved = False  # result/error are final (callbacks may still be running)
        self.done = threading.Event()  # set once every callback has run
        self.result: Any = None
        self.error: BaseException | None = None
        self._callbacks: list[Callable[[CompileJob], None]] = []
        self._callbacks_ran = False
        self._lock = threading.Lock()

    def add_done_callback(self, fn: Callable[[CompileJob], None]) -> None:
        """`fn(job)` once resolved, in the order added (at once if it already is)."""
        with self._lock:
            if not self._callbacks_ran:
                self._callbacks.append(fn)
                return
        fn(self)

    def wait(self) -> Any:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result

    def resolve(self, result: Any = None, error: BaseException | None = None) -> bool:
        """The first call wins: run the callbacks, then wake `wait`; later calls do nothing."""
        with self._lock:
            if self.resolved:
                return False
            self.resolved = True
            self.result, self.error = result, error
        while True:
            with self._lock:
                if not self._callbacks:
                    self._callbacks_ran = True
                    break
                fn = self._callbacks.pop(0)
            try:
                fn(self)
            except Exception:  # noqa: BLE001 - one waiter's bug must not stop the others
                logger.exception("a grammar compile callback failed")
        self.done.set()
        return True


class GrammarCompilePool:
    """`num_threads` compile threads and one watchdog, started on the first submit."""

    def __init__(self, limits: GrammarLimits) -> None:
        self.limits = limits
        self._cond = threading.Condition()
        self._queued: deque[CompileJob] = deque()
        self._running: set[CompileJob] = set()  # includes compiles past their limit
        self._started = False
        self._closed = False

    @property
    def num_pending(self) -> int:
        with self._cond:
            return len(self._queued) + len(self._running)

    def submit(self, fn: Callable[[], Any], on_done: Callable[[CompileJob], None] | None = None,
               setup: Callable[[], Any] | None = None) -> CompileJob:
        """Queue a compile (`on_done` runs first when it ends; `setup` runs on the compile
        thread before the time limit's clock starts); GrammarBusy at once when `max_pending`
        are queued or running."""
        job = CompileJob(fn, setup)
        if on_done is not None:
            job.add_done_callback(on_done)
        with self._cond:
            if self._closed:
                raise GrammarBusy("the grammar compiler is shut down")
            if len(self._queued) + len(self._running) >= self.limits.max_pending:
                raise GrammarBusy(f"{self.limits.max_pending} grammar compiles are already "
                                  "queued or running")
            if not self._started:
                self._start()
            self._queued.append(job)
            self._cond.notify_all()
        return job

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            queued, self._queued = list(self._queued), deque()
            self._cond.notify_all()
        for job in queued:
            job.resolve(error=GrammarBusy("the grammar compiler is shut down"))

    def _start(self) -> None:
        self._started = True
        if not _POOLS:
            atexit.register(_wait_at_exit)
        _POOLS.add(self)
        for i in range(self.limits.num_threads):
            threading.Thread(target=self._work, name=f"grammar-compile-{i}", daemon=True).start()
        threading.Thread(target=self._watch, name="grammar-watchdog", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queued and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._queued.popleft()
                if job.resolved:  # timed out in the queue already
                    continue
                self._running.add(job)
            try:
                if job.setup is not None:
                    job.setup()
                with self._cond:
                    job.started_at = time.monotonic()
                    self._cond.notify_all()  # the watchdog learns the new deadline
                result, error = job.fn(), None
            except BaseException as exc:  # noqa: BLE001 - handed to the waiters
                result, error = None, exc
            with self._cond:
                self._running.discard(job)
                self._cond.notify_all()
            if not job.resolve(result, error) and job.started_at is not None:
                logger.warning("a grammar compile finished %.1f s after it started, past its "
                               "%.1f s limit", time.monotonic() - job.started_at,
                               self.limits.time_limit_s)

    def _watch(self) -> None:
        limits = self.limits
        while True:
            expired: list[tuple[CompileJob, BaseException]] = []
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                next_at = now + 60.0
                while self._queued and self._queued[0].queued_at + limits.queue_wait_s <= now:
                    job = self._queued.popleft()
                    expired.append((job, GrammarBusy(
                        f"no grammar compile thread was free within {limits.queue_wait_s:g} s")))
                if self._queued:
                    next_at = min(next_at, self._queued[0].queued_at + limits.queue_wait_s)
                for job in self._running:
                    if job.resolved or job.started_at is None:
                        continue
                    deadline = job.started_at + limits.time_limit_s
                    if deadline <= now:
                        expired.append((job, GrammarTooComplex(
                            f"did not compile within {limits.time_limit_s:g} s")))
                    else:
                        next_at = min(next_at, deadline)
                if not expired:
                    self._cond.wait(max(next_at - now, 0.001))
            for job, error in expired:
                job.resolve(error=error)
