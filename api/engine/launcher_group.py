"""The engine cores of a many-model server: started in parallel, each restarted when it dies
(`fornax serve` process).

It stands where a one-model server has its EngineLauncher (same drain, wait, stop and cleanup),
but a dead engine does not end the server: its model answers 503 while the engine is started
again at once (then after 1, 2, 4 ... up to 60 s while it keeps failing to start), and the API
workers reconnect to it when it is READY (api/engine/client.py). The other models keep serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fornax.api.engine.engine_control import EngineLink, process_memory
from fornax.api.engine.launcher import EngineLauncher, EngineStartError
from fornax.runtime.engine.messages import AdminResult, EngineHandshake

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0  # a "still loading" line this often while engines start
RESTART_BACKOFF_MAX_S = 60.0


class EngineGroup:
    """One EngineLauncher per model, in the configured order."""

    def __init__(self, models: list[tuple[str, str, dict[str, Any]]],
                 drain_timeout_s: float) -> None:
        """`models`: (name shown in logs, MODEL, engine keyword arguments) of each model."""
        self.names = [name for name, _, _ in models]
        self.launchers = [EngineLauncher(model, kwargs, drain_timeout_s)
                          for _, model, kwargs in models]
        self.ipc_dir = self.launchers[0].ipc_dir  # the prometheus files live in the first one's
        self.drain_timeout_s = drain_timeout_s
        self.stopping = False
        self.restarts = [0] * len(models)
        self.generations = [0] * len(models)  # +1 at each unload: older watchers then retire
        self.footprints = [0] * len(models)  # peak engine RSS seen for each model (bytes)
        self.loaded = [True] * len(models)  # which engines `start` left running
        self._links: dict[int, EngineLink] = {}  # the model manager's, for sleep and wake-up

    def start(self, max_loaded: int = 0, budget: int = 0) -> list[EngineHandshake]:
        """Start every engine (at most `max_loaded` at once, 0: all) and wait for them;
        EngineStartError naming the model that failed (the others are stopped). With a bound,
        batches start from the last models and stop again once READY (their handshakes are all
        the API workers need), so the first `max_loaded` models are the ones left loaded. With
        a memory `budget` (bytes) they start one at a time to measure each one's footprint, and
        an engine that does not fit beside the ones kept is stopped again."""
        n = len(self.launchers)
        if budget:
            return self._start_measured(max_loaded, budget)
        if not max_loaded or max_loaded >= n:
            started = self._start_batch(list(range(n)))
            for i in range(n):
                self.note_footprint(i)
            return started
        infos: dict[int, EngineHandshake] = {}
        batches = [list(range(max(0, end - max_loaded), end))
                   for end in range(n, 0, -max_loaded)]
        for batch in batches:
            infos.update(zip(batch, self._start_batch(batch), strict=True))
            for i in batch:
                self.note_footprint(i)
            if batch is not batches[-1]:
                for i in batch:
                    self.launchers[i].stop(self.drain_timeout_s)
                    self.loaded[i] = False
                logger.info("stopped %s again (--max-loaded-models %d): loaded on demand",
                            ", ".join(self.names[i] for i in batch), max_loaded)
        return [infos[i] for i in range(n)]

    def _start_measured(self, max_loaded: int, budget: int) -> list[EngineHandshake]:
        """One engine at a time, in order: each is kept loaded while the ones kept and it fit
        under `budget` (and `max_loaded`), else stopped once its footprint is known."""
        infos: list[EngineHandshake] = []
        kept = 0
        for i, name in enumerate(self.names):
            infos += self._start_batch([i])
            size = self.note_footprint(i)
            full = bool(max_loaded) and sum(self.loaded[:i]) >= max_loaded
            if full or kept + size > budget:
                self.launchers[i].stop(self.drain_timeout_s)
                self.loaded[i] = False
                why = ("larger than the memory budget alone, its requests get 503"
                       if size > budget else f"--max-loaded-models {max_loaded}" if full else
                       "it does not fit beside the models loaded under the memory budget of "
                       f"{budget / 2**30:.2f} GiB")
                logger.info("stopped %s again (%.2f GiB; %s): loaded on demand", name,
                            size / 2**30, why)
            else:
                kept += size
        return infos

    def memory(self, i: int) -> tuple[int, int]:
        """Model i's engine process: (resident bytes now, peak resident bytes); (0, 0) when it
        is not running."""
        proc = self.launchers[i].proc
        if proc is None or proc.poll() is not None:
            return 0, 0
        return process_memory(proc.pid)

    def note_footprint(self, i: int) -> int:
        """Remember model i's footprint: the largest peak RSS its engine has reached."""
        self.footprints[i] = max(self.footprints[i], self.memory(i)[1])
        return self.footprints[i]

    def admin(self, i: int, command: str, level: int = 1) -> AdminResult:
        """Sleep or wake model i's engine (api/engine/engine_control.py), over a link made
        once per engine process."""
        proc = self.launchers[i].proc
        if proc is None or proc.poll() is not None:
            return AdminResult(0, 503, "the engine is not running")
        link = self._links.get(i)
        if link is None or link.pid != proc.pid:
            if link is not None:
                link.close()
            link = self._links[i] = EngineLink(self.launchers[i].ipc_dir, proc.pid)
        return link.admin(command, level, alive=lambda: proc.poll() is None)

    def _start_batch(self, indices: list[int]) -> list[EngineHandshake]:
        launchers = [self.launchers[i] for i in indices]
        names = [self.names[i] for i in indices]
        results: list[EngineHandshake | BaseException | None] = [None] * len(launchers)
        began = time.monotonic()

        def start_one(i: int) -> None:
            try:
                results[i] = info = launchers[i].start()
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                results[i] = exc
                return
            logger.info("engine core %d/%d ready after %.1f s: %s (%s, %s, max_model_len %d)",
                        sum(r is not None for r in results), len(results),
                        time.monotonic() - began, names[i], info.architecture, info.runner,
                        info.max_model_len)

        threads = [threading.Thread(target=start_one, args=(i,), name=f"engine-start-{i}",
                                    daemon=True) for i in range(len(launchers))]
        logger.info("starting %d engine cores in parallel: %s", len(threads), ", ".join(names))
        try:
            for t in threads:
                t.start()
            next_line = began + PROGRESS_EVERY_S
            for t in threads:
                while t.is_alive():  # short joins: SIGINT/SIGTERM reach the main thread
                    t.join(0.2)
                    if time.monotonic() >= next_line:
                        next_line += PROGRESS_EVERY_S
                        logger.info("still loading after %.0f s: %s", time.monotonic() - began,
                                    ", ".join(n for n, r in zip(names, results, strict=True)
                                              if r is None))
        except BaseException:
            self.kill()
            raise
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException) or result is None:
                self.kill()
                raise EngineStartError(f"{name}: {result}")
        return [r for r in results if isinstance(r, EngineHandshake)]

    def watch(self, on_death: Callable[[int], None]) -> None:
        """Restart each engine that dies while the server is not stopping (`on_death`, the
        one-model server's exit, is never called)."""
        del on_death
        for i in range(len(self.launchers)):
            self.supervise(i)

    def supervise(self, i: int) -> None:
        """Watch model i's engine process (again after the model manager loaded it)."""
        threading.Thread(target=self._supervise, args=(i, self.generations[i]),
                         name=f"engine-watch-{i}", daemon=True).start()

    def unload(self, i: int, timeout_s: float) -> int | None:
        """Stop model i's engine for good (the model manager's unload): its watcher, even one
        that wakes after the model was loaded again, neither restarts it nor a second one."""
        self.generations[i] += 1
        return self.launchers[i].stop(timeout_s)

    def _supervise(self, i: int, generation: int) -> None:
        launcher, name = self.launchers[i], self.names[i]

        def retired() -> bool:
            return self.stopping or launcher.stopping or self.generations[i] != generation

        while True:
            proc = launcher.proc
            if proc is None:
                return
            code = proc.wait()
            if retired() or launcher.proc is not proc:
                return
            logger.error("the engine core of %s died (exit code %s): its requests get 503 while "
                         "it restarts; the other models keep serving", name, code)
            delay = 1.0
            while not retired():  # an unload during the backoff ends the restarts
                began = time.monotonic()
                try:
                    launcher.start()
                except EngineStartError as exc:
                    logger.error("restarting %s failed (%s); trying again in %.0f s", name, exc,
                                 delay)
                    time.sleep(delay)
                    delay = min(2 * delay, RESTART_BACKOFF_MAX_S)
                    continue
                self.restarts[i] += 1
                logger.info("the engine core of %s is back after %.1f s (restart %d)", name,
                            time.monotonic() - began, self.restarts[i])
                break

    def request_drain(self) -> None:
        self.stopping = True
        for launcher in self.launchers:
            launcher.request_drain()

    def abort_now(self) -> None:
        self.stopping = True
        for launcher in self.launchers:
            launcher.abort_now()

    def wait(self, timeout_s: float) -> int | None:
        """Wait up to `timeout_s` in all for every engine to exit; the first non-zero code."""
        deadline = time.monotonic() + timeout_s
        codes = [launcher.wait(max(0.0, deadline - time.monotonic()))
                 for launcher in self.launchers]
        return next((c for c in codes if c), codes[0] if codes else None)

    def stop(self, timeout_s: float) -> int | None:
        self.request_drain()  # every engine drains at once, then each is waited for (or killed)
        codes = [launcher.stop(timeout_s) for launcher in self.launchers]
        return next((c for c in codes if c), codes[0] if codes else None)

    def kill(self) -> None:
        self.stopping = True
        for launcher in self.launchers:
            launcher.kill()

    def cleanup(self) -> None:
        for launcher in self.launchers:
            launcher.cleanup()
