"""Grammar compiles on a fixed set of threads with a bounded queue, a time limit per compile and
a limit on the wait for a thread (engine-core process).

xgrammar's compile is C++ that releases the GIL (the busy loop keeps running beside it) but
cannot be interrupted: a compile past its limit is answered at once ("too complex") while its
thread runs on until xgrammar returns, still counted against the pool. So at most
`grammar_compile_threads` compiles ever run, at most `grammar_max_pending_compiles` wait or run,
and a job that waits longer than the time limit for a thread (not counting the compiler's own
load, the first constrained request's import of xgrammar) is answered "busy" — a stream of
pathological grammars costs those threads and a 503 for later compiles, never the engine's loop or an unbounded pile of threads.
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
from typing import Any

from fornax.runtime.config import StructuredOutputsConfig

logger = logging.getLogger(__name__)


_POOLS: weakref.WeakSet[GrammarCompilePool] = weakref.WeakSet()


def num_compiling() -> int:
    """Compiles still inside xgrammar in this process (including those past their limit)."""
    return sum(len(pool._running) for pool in list(_POOLS))


def exit_process(code: int) -> None:
    """The engine-core process's end: exit with `code` at once (logs flushed), without the
    interpreter's shutdown, which would first join every worker thread: xgrammar's prewarm
    (importing xgrammar and transformers takes seconds, tens of seconds on a loaded machine;
    on the first constrained request, or at start-up with FORNAX_GRAMMAR_PREWARM=1) and runaway
    compiles (one that returns from xgrammar into an
    interpreter that is shutting down aborts the process: std::terminate)."""
    if num_compiling():
        logger.warning("exiting with %d grammar compiles still running", num_compiling())
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
        self.queued_clock = 0.0  # the pool's queue clock when queued (GrammarCompilePool._clock)
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
    """`grammar_compile_threads` compile threads and one watchdog, started on the first submit."""

    def __init__(self, limits: StructuredOutputsConfig) -> None:
        self.limits = limits
        self._cond = threading.Condition()
        self._queued: deque[CompileJob] = deque()
        self._running: set[CompileJob] = set()  # includes compiles past their limit
        self._started = False
        self._closed = False
        # The wait for a thread does not count time a setup runs (the first one loads xgrammar,
        # seconds): the queue's clock is the monotonic clock less the time spent in setups.
        self._loading = 0  # setups running
        self._paused_s = 0.0  # total time some setup ran, up to _paused_since
        self._paused_since = 0.0

    def _clock(self, now: float) -> float:
        """The queue's clock at `now` (lock held): stopped while any setup runs."""
        return now - self._paused_s - (now - self._paused_since if self._loading else 0.0)

    def _setup(self, job: CompileJob) -> None:
        """Run the job's setup with the queue's clock stopped."""
        with self._cond:
            if not self._loading:
                self._paused_since = time.monotonic()
            self._loading += 1
        try:
            job.setup()  # type: ignore[misc]  # the caller checked it is set
        finally:
            with self._cond:
                self._loading -= 1
                if not self._loading:
                    self._paused_s += time.monotonic() - self._paused_since
                self._cond.notify_all()  # the watchdog's queue clock runs again

    @property
    def num_pending(self) -> int:
        with self._cond:
            return len(self._queued) + len(self._running)

    def submit(self, fn: Callable[[], Any], on_done: Callable[[CompileJob], None] | None = None,
               setup: Callable[[], Any] | None = None) -> CompileJob:
        """Queue a compile (`on_done` runs first when it ends; `setup` runs on the compile
        thread before the time limit's clock starts); GrammarBusy at once when
        `grammar_max_pending_compiles` are queued or running."""
        job = CompileJob(fn, setup)
        if on_done is not None:
            job.add_done_callback(on_done)
        with self._cond:
            if self._closed:
                raise GrammarBusy("the grammar compiler is shut down")
            most = self.limits.grammar_max_pending_compiles
            if len(self._queued) + len(self._running) >= most:
                raise GrammarBusy(f"{most} grammar compiles are already queued or running")
            if not self._started:
                self._start()
            job.queued_clock = self._clock(time.monotonic())
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
        for i in range(self.limits.grammar_compile_threads):
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
                    self._setup(job)
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
                               self.limits.grammar_compile_timeout_s)

    def _watch(self) -> None:
        limits = self.limits
        while True:
            expired: list[tuple[CompileJob, BaseException]] = []
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                next_at = now + 60.0
                wait_s = limits.grammar_queue_wait_s
                clock = self._clock(now)  # stopped while a setup loads the compiler
                while self._queued and not self._loading \
                        and self._queued[0].queued_clock + wait_s <= clock:
                    job = self._queued.popleft()
                    expired.append((job, GrammarBusy(
                        f"no grammar compile thread was free within {wait_s:g} s")))
                if self._queued and not self._loading:  # else woken when the setup ends
                    next_at = min(next_at, now + self._queued[0].queued_clock + wait_s - clock)
                for job in self._running:
                    if job.resolved or job.started_at is None:
                        continue
                    deadline = job.started_at + limits.grammar_compile_timeout_s
                    if deadline <= now:
                        expired.append((job, GrammarTooComplex(
                            f"did not compile within {limits.grammar_compile_timeout_s:g} s")))
                    else:
                        next_at = min(next_at, deadline)
                if not expired:
                    self._cond.wait(max(next_at - now, 0.001))
            for job, error in expired:
                job.resolve(error=error)
