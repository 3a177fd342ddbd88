"""A many-model server's model manager: loads models on demand, unloads idle ones and keeps at
most --max-loaded-models loaded, the least recently used out first (`fornax serve` process).

The API workers talk to it over one ZMQ ROUTER (runtime/engine/messages.py: ModelCommand in,
ModelStates out): `ensure` before a request for a model that is not loaded (answered once its
engine is READY), `begin`/`end` around every request (idle time, in-flight count, keep_alive),
`load`/`unload` from the admin routes, `status` for /v1/models and `cancel` when an `ensure`
or `load` is given up (a grant nobody waits for would leave the model busy for good). Unloading stops the model's
engine process (its memory goes back to the system); the engine drains in-flight requests first.
One thread owns the socket; loads and unloads run in their own threads and report back through
a queue, so every reply is sent by the owner.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time

import msgspec
import zmq

from fornax.api.engine.launcher import EngineStartError
from fornax.api.engine.launcher_group import EngineGroup
from fornax.api.engine.manager_client import control_address
from fornax.runtime.engine.messages import ModelCommand, ModelStates

logger = logging.getLogger(__name__)

TICK_S = 0.2  # the owner thread's poll: idle checks and finished loads this often
LOADED, LOADING, UNLOADING, UNLOADED, FAILED = ("loaded", "loading", "unloading", "unloaded",
                                                "failed")


class ModelManager:
    """The load state of every model of an EngineGroup, and the rules that change it."""

    def __init__(self, group: EngineGroup, idle_timeouts: list[float], max_loaded: int,
                 loaded: list[bool]) -> None:
        self.group = group
        self.names = group.names
        self.idle_timeouts = idle_timeouts  # 0: never unloaded for idleness
        self.max_loaded = max_loaded  # 0: no bound
        self.states = [LOADED if on else UNLOADED for on in loaded]
        now = time.monotonic()
        self.last_used = [now] * len(loaded)
        self.busy = [0] * len(loaded)
        self.expires: list[float | None] = [None] * len(loaded)  # a request's keep_alive
        self.waiters: list[list[tuple[bytes, int, str]]] = [[] for _ in loaded]
        self.pending: list[int] = []  # wanted, waiting for room under max_loaded
        self.address = control_address(group.ipc_dir)
        self._events: queue.Queue[tuple[str, int, str]] = queue.Queue()
        self._stop = threading.Event()
        self._encoder = msgspec.msgpack.Encoder()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        ctx: zmq.Context = zmq.Context.instance()
        self._router = ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(self.address)
        self._thread = threading.Thread(target=self._run, name="model-manager", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    # ---- the owner thread ----------------------------------------------------------------------
    def _run(self) -> None:
        decoder = msgspec.msgpack.Decoder(ModelCommand)
        while not self._stop.is_set():
            if self._router.poll(int(TICK_S * 1000)):
                identity, payload = self._router.recv_multipart()
                try:
                    self._command(identity, decoder.decode(payload))
                except (msgspec.DecodeError, IndexError) as exc:
                    logger.warning("model manager: bad command (%s)", exc)
            while True:
                try:
                    event, i, detail = self._events.get_nowait()
                except queue.Empty:
                    break
                self._finished(event, i, detail)
            self._schedule()
            self._unload_idle()
        self._router.close(linger=0)

    def _command(self, identity: bytes, cmd: ModelCommand) -> None:
        i, now = cmd.model, time.monotonic()
        if cmd.op == "status":
            self._reply(identity, cmd.query_id)
            return
        if not 0 <= i < len(self.states):
            self._reply(identity, cmd.query_id, f"no model number {i}")
            return
        if cmd.op == "end":
            self.busy[i] = max(0, self.busy[i] - 1)
            self.last_used[i] = now
            if cmd.keep_alive_s is not None:
                self.expires[i] = math.inf if cmd.keep_alive_s < 0 else now + cmd.keep_alive_s
        elif cmd.op in ("ensure", "load"):  # ensure: a request starts (busy until its end)
            self.last_used[i] = now
            if self.states[i] == LOADED:
                self._granted(i, cmd.op)
                self._reply(identity, cmd.query_id)
                return
            self.waiters[i].append((identity, cmd.query_id, cmd.op))
            if self.states[i] in (UNLOADED, FAILED, UNLOADING) and i not in self.pending:
                self.pending.append(i)
                logger.info("%s is wanted (%s); loading it", self.names[i],
                            "a request for it" if cmd.op == "ensure" else "POST load")
        elif cmd.op == "cancel":  # the asker stopped waiting: it must not be granted (busy)
            self.waiters[i] = [w for w in self.waiters[i]
                               if w[0] != identity or w[1] != cmd.query_id]
            self._reply(identity, cmd.query_id, "cancelled")
        elif cmd.op == "unload":
            if i in self.pending:  # its waiters learn now (503), not after LOAD_TIMEOUT_S
                self.pending.remove(i)
                waiters, self.waiters[i] = self.waiters[i], []
                for who, query_id, _ in waiters:
                    self._reply(who, query_id, f"{self.names[i]} was unloaded (POST "
                                "/v1/models/{id}/unload) before it finished loading")
            if self.states[i] == LOADED:
                self._unload(i, "POST unload")
            self._reply(identity, cmd.query_id)
        else:
            self._reply(identity, cmd.query_id, f"unknown operation {cmd.op!r}")

    def _reply(self, identity: bytes, query_id: int, error: str = "") -> None:
        msg = ModelStates(query_id, list(self.states), error)
        self._router.send_multipart([identity, self._encoder.encode(msg)])

    def _schedule(self) -> None:
        """Start the wanted models that fit under max_loaded; make room by unloading the least
        recently used idle model (busy ones are never evicted: they finish first)."""
        while self.pending:
            i = self.pending[0]
            if self.states[i] == UNLOADING:
                return  # stopping: load it again once it is gone
            held = sum(s in (LOADED, LOADING, UNLOADING) for s in self.states)
            if self.max_loaded and held >= self.max_loaded:
                idle = [j for j, s in enumerate(self.states)
                        if s == LOADED and not self.busy[j] and j not in self.pending]
                if idle and not any(s == UNLOADING for s in self.states):
                    lru = min(idle, key=lambda j: self.last_used[j])
                    self._unload(lru, f"--max-loaded-models {self.max_loaded}: least recently "
                                 f"used, to load {self.names[i]}")
                return
            self.pending.pop(0)
            self.states[i] = LOADING
            threading.Thread(target=self._load, args=(i,), name=f"model-load-{i}",
                             daemon=True).start()

    def _unload_idle(self) -> None:
        now = time.monotonic()
        for i, state in enumerate(self.states):
            if state != LOADED or self.busy[i] or i in self.pending:
                continue
            until = self.expires[i]
            if until is None:
                timeout = self.idle_timeouts[i]
                until = self.last_used[i] + timeout if timeout > 0 else math.inf
            if now >= until:
                self._unload(i, f"idle for {now - self.last_used[i]:.0f} s")

    def _unload(self, i: int, why: str) -> None:
        self.states[i] = UNLOADING
        logger.info("unloading %s (%s)", self.names[i], why)
        threading.Thread(target=self._stop_engine, args=(i,), name=f"model-unload-{i}",
                         daemon=True).start()

    def _finished(self, event: str, i: int, detail: str) -> None:
        self.states[i] = {"loaded": LOADED, "unloaded": UNLOADED}.get(event, FAILED)
        self.expires[i] = None
        self.last_used[i] = time.monotonic()
        if event == "unloaded":
            return
        waiters, self.waiters[i] = self.waiters[i], []
        for identity, query_id, op in waiters:
            if event == "loaded":
                self._granted(i, op)
            self._reply(identity, query_id, detail if event == "failed" else "")

    def _granted(self, i: int, op: str) -> None:
        """A request may use model i: it is busy (never evicted) until the request's `end`."""
        if op == "ensure":
            self.busy[i] += 1
            self.expires[i] = None

    # ---- load and unload threads ---------------------------------------------------------------
    def _load(self, i: int) -> None:
        launcher = self.group.launchers[i]
        began = time.monotonic()
        launcher.stopping = False
        try:
            launcher.start()
        except EngineStartError as exc:
            logger.error("loading %s failed: %s", self.names[i], exc)
            self._events.put(("failed", i, f"{self.names[i]} failed to load: {exc}"))
            return
        logger.info("loaded %s in %.1f s", self.names[i], time.monotonic() - began)
        self.group.supervise(i)
        self._events.put(("loaded", i, ""))

    def _stop_engine(self, i: int) -> None:
        code = self.group.unload(i, self.group.drain_timeout_s + 5)
        logger.info("unloaded %s (engine exit code %s)", self.names[i], code)
        self._events.put(("unloaded", i, ""))
