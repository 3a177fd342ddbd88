"""A many-model server's model manager: loads models on demand, unloads (or puts to sleep) idle
ones and keeps at most --max-loaded-models loaded within --max-loaded-memory bytes, the least
recently used out first (`fornax serve` process).

The API workers talk to it over one ZMQ ROUTER (runtime/engine/messages.py: ModelCommand in,
ModelStates out): `ensure` before a request for a model that is not loaded (answered once its
engine is READY), `begin`/`end` around every request (idle time, in-flight count, keep_alive),
`load`/`unload` from the admin routes, `status` for /v1/models and `cancel` when an `ensure`
or `load` is given up (a grant nobody waits for would leave the model busy for good). Unloading stops the model's
engine process (its memory goes back to the system); the engine drains in-flight requests first.
An unload asked while the model loads, wakes or falls asleep is done as soon as that is over (the
model shows as unloading meanwhile) and the requests waiting for that load get a 503 naming it.
A model whose idle_action is `sleep` is put to sleep instead when idle (level 1: its KV cache
released, the process and its weights kept) and woken by its next request. The memory budget
counts each engine's resident memory (/proc), a loaded model at least at the largest footprint
it has shown, and is checked before a load or a wake-up: least recently used idle models are
stopped until the model fits; one larger than the budget alone is refused.
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
from fornax.api.engine.launcher_group import PROGRESS_EVERY_S, EngineGroup
from fornax.api.engine.manager_client import control_address
from fornax.runtime.engine.messages import ModelCommand, ModelStates

logger = logging.getLogger(__name__)

TICK_S = 0.2  # the owner thread's poll: idle checks and finished loads this often
LOADED, LOADING, UNLOADING, UNLOADED, FAILED = ("loaded", "loading", "unloading", "unloaded",
                                                "failed")
SLEEPING, ASLEEP, WAKING = "sleeping", "asleep", "waking"  # idle_action: sleep
_HELD = (LOADED, LOADING, UNLOADING, SLEEPING, ASLEEP, WAKING)  # an engine process runs
SLEEP_LEVEL = 1  # KV cache released; weights kept (on a GPU: moved to host memory)


class ModelManager:
    """The load state of every model of an EngineGroup, and the rules that change it."""

    def __init__(self, group: EngineGroup, idle_timeouts: list[float], max_loaded: int,
                 loaded: list[bool], budget: int = 0,
                 idle_actions: list[str] | None = None) -> None:
        self.group = group
        self.names = group.names
        self.idle_timeouts = idle_timeouts  # 0: never unloaded for idleness
        self.max_loaded = max_loaded  # 0: no bound
        self.budget = budget  # bytes of engine RSS for all models together; 0: no bound
        self.idle_actions = idle_actions or ["stop"] * len(loaded)  # "stop" or "sleep"
        self.states = [LOADED if on else UNLOADED for on in loaded]
        now = time.monotonic()
        self.last_used = [now] * len(loaded)
        self.busy = [0] * len(loaded)
        self.expires: list[float | None] = [None] * len(loaded)  # a request's keep_alive
        self.waiters: list[list[tuple[bytes, int, str]]] = [[] for _ in loaded]
        self.pending: list[int] = []  # wanted, waiting for room under max_loaded
        self.began: dict[int, tuple[float, float]] = {}  # loads under way: began, next line
        # POST unload while loading, waking or falling asleep: unloaded once that is over
        self.unload_asked: set[int] = set()
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
            self._progress()
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
            if (self.states[i] in (UNLOADED, FAILED, UNLOADING, SLEEPING, ASLEEP)
                    or i in self.unload_asked) and i not in self.pending:  # after the unload
                self.pending.append(i)
                logger.info("%s is wanted (%s); %s it", self.names[i],
                            "a request for it" if cmd.op == "ensure" else "POST load",
                            "waking" if self.states[i] in (SLEEPING, ASLEEP) else "loading")
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
            if self.states[i] in (LOADED, ASLEEP):
                self._unload(i, "POST unload")
            elif self.states[i] in (SLEEPING, LOADING, WAKING):  # unloaded once that is over
                self._unload_later(i)
            self._reply(identity, cmd.query_id)
        else:
            self._reply(identity, cmd.query_id, f"unknown operation {cmd.op!r}")

    def _unload_later(self, i: int) -> None:
        """POST unload while model i loads, wakes or falls asleep: it is unloaded as soon as
        that is over (shown as unloading meanwhile); the requests waiting for its load or
        wake-up get their 503 now."""
        doing = {LOADING: "loading", WAKING: "waking up"}.get(self.states[i], "falling asleep")
        self.unload_asked.add(i)
        logger.info("unloading %s (POST unload) once it is done %s", self.names[i], doing)
        waiters, self.waiters[i] = self.waiters[i], []
        for who, query_id, _ in waiters:
            self._reply(who, query_id, f"{self.names[i]} was unloaded (POST "
                        f"/v1/models/{{id}}/unload) while it was {doing}")

    def _reply(self, identity: bytes, query_id: int, error: str = "",
               lasting: bool = False) -> None:
        states = [UNLOADING if i in self.unload_asked else s for i, s in enumerate(self.states)]
        msg = ModelStates(query_id, states, error, lasting)
        self._router.send_multipart([identity, self._encoder.encode(msg)])

    def _schedule(self) -> None:
        """Start (or wake) the wanted models that fit under max_loaded and the memory budget;
        make room by stopping the least recently used idle model (busy ones are never
        evicted: they finish first). A model larger than the budget alone is refused."""
        while self.pending:
            i = self.pending[0]
            if self.states[i] in (UNLOADING, SLEEPING) or i in self.unload_asked:
                return  # stopping, or to be: load or wake it once that is done
            if self.states[i] in (LOADED, LOADING, WAKING):  # a refused sleep left it loaded
                self.pending.pop(0)
                if self.states[i] == LOADED:
                    self._answer(i, "")
                continue
            need = self.group.footprints[i] if self.budget else 0
            if need > self.budget > 0:
                self.pending.pop(0)
                self._answer(i, f"{self.names[i]} needs {need / 2**30:.2f} GiB, more than the "
                             f"whole memory budget (--max-loaded-memory {self.budget / 2**30:.2f}"
                             " GiB): raise the budget, or give the model less memory "
                             "(--kv-cache-memory, --max-model-len)", lasting=True)
                continue
            why = self._no_room(i)
            if why:
                idle = [j for j, s in enumerate(self.states) if s in (LOADED, ASLEEP)
                        and not self.busy[j] and j not in self.pending]
                if idle and not any(s == UNLOADING for s in self.states):
                    lru = min(idle, key=lambda j: self.last_used[j])
                    self._unload(lru, f"{why}: least recently used, to load {self.names[i]}")
                return
            self.pending.pop(0)
            waking = self.states[i] == ASLEEP
            self.states[i] = WAKING if waking else LOADING
            self.began[i] = (time.monotonic(), time.monotonic() + PROGRESS_EVERY_S)
            threading.Thread(target=self._wake if waking else self._load, args=(i,),
                             name=f"model-load-{i}", daemon=True).start()

    def _no_room(self, i: int) -> str:
        """Why model i cannot be loaded (or woken) now, or "" when it fits."""
        others = [j for j, s in enumerate(self.states) if s in _HELD and j != i]
        if self.max_loaded and len(others) >= self.max_loaded:
            return f"--max-loaded-models {self.max_loaded}"
        if self.budget:
            used = sum(self._resident(j) for j in others)
            if used + self.group.footprints[i] > self.budget:
                return (f"--max-loaded-memory {self.budget / 2**30:.2f} GiB ({used / 2**30:.2f} "
                        f"GiB held, {self.names[i]} needs {self.group.footprints[i] / 2**30:.2f} GiB)")
        return ""

    def _resident(self, j: int) -> int:
        """The memory model j's engine holds against the budget: what it holds now, and a
        loaded (awake) model at least its largest footprint so far."""
        rss = self.group.memory(j)[0]
        if self.states[j] in (LOADED, LOADING, WAKING):
            return max(rss, self.group.footprints[j])
        return rss

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
                why = f"idle for {now - self.last_used[i]:.0f} s"
                if self.idle_actions[i] == "sleep":
                    self._sleep(i, why)
                else:
                    self._unload(i, why)
            elif self.budget:
                self.group.note_footprint(i)  # it may grow while it serves

    def _progress(self) -> None:
        """A "still loading" line every PROGRESS_EVERY_S for each load under way."""
        now = time.monotonic()
        for i, (began, line_at) in list(self.began.items()):
            if self.states[i] not in (LOADING, WAKING):
                del self.began[i]
            elif now >= line_at:
                self.began[i] = (began, now + PROGRESS_EVERY_S)
                logger.info("still %s %s after %.0f s (%d request(s) waiting)",
                            "loading" if self.states[i] == LOADING else "waking", self.names[i],
                            now - began, len(self.waiters[i]))

    def _sleep(self, i: int, why: str) -> None:
        self.states[i] = SLEEPING
        logger.info("putting %s to sleep (%s)", self.names[i], why)
        threading.Thread(target=self._sleep_engine, args=(i,), name=f"model-sleep-{i}",
                         daemon=True).start()

    def _unload(self, i: int, why: str) -> None:
        self.states[i] = UNLOADING
        logger.info("unloading %s (%s)", self.names[i], why)
        threading.Thread(target=self._stop_engine, args=(i,), name=f"model-unload-{i}",
                         daemon=True).start()

    def _finished(self, event: str, i: int, detail: str) -> None:
        self.expires[i] = None
        self.last_used[i] = time.monotonic()
        asked = i in self.unload_asked
        self.unload_asked.discard(i)
        if asked and event in ("asleep", "awake", "loaded"):  # POST unload came meanwhile
            self._unload(i, "POST unload")
            return
        if event == "asleep":
            self.states[i] = ASLEEP
            return
        if event == "awake":  # the engine refused to sleep (a request came in between)
            logger.warning("%s stays loaded: %s", self.names[i], detail)
            self.states[i] = LOADED
            return
        if event == "wake-failed":  # stopped, then loaded afresh for its waiters
            logger.error("waking %s failed (%s); restarting its engine", self.names[i], detail)
            self._unload(i, "its wake-up failed")
            if i not in self.pending and not asked:  # else its waiters were answered
                self.pending.insert(0, i)
            return
        self.states[i] = {"loaded": LOADED, "unloaded": UNLOADED}.get(event, FAILED)
        if event == "unloaded":
            return
        self._answer(i, detail if event == "failed" else "")

    def _answer(self, i: int, error: str, lasting: bool = False) -> None:
        """Answer every request waiting for model i: granted, or refused with `error`."""
        waiters, self.waiters[i] = self.waiters[i], []
        for identity, query_id, op in waiters:
            if not error:
                self._granted(i, op)
            self._reply(identity, query_id, error, lasting)

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
        size = self.group.note_footprint(i)
        logger.info("loaded %s in %.1f s (engine RSS %.2f GiB)", self.names[i],
                    time.monotonic() - began, size / 2**30)
        self.group.supervise(i)
        self._events.put(("loaded", i, ""))

    def _sleep_engine(self, i: int) -> None:
        result = self.group.admin(i, "sleep", SLEEP_LEVEL)
        if result.status != 200:
            self._events.put(("awake", i, f"sleep refused ({result.status}: {result.message})"))
            return
        logger.info("%s is asleep (engine RSS %.2f GiB)", self.names[i],
                    self.group.memory(i)[0] / 2**30)
        self._events.put(("asleep", i, ""))

    def _wake(self, i: int) -> None:
        began = time.monotonic()
        result = self.group.admin(i, "wake_up")
        if result.status != 200:
            self._events.put(("wake-failed", i, f"{result.status}: {result.message}"))
            return
        logger.info("woke %s in %.1f s (engine RSS %.2f GiB)", self.names[i],
                    time.monotonic() - began, self.group.memory(i)[0] / 2**30)
        self._events.put(("loaded", i, ""))

    def _stop_engine(self, i: int) -> None:
        code = self.group.unload(i, self.group.drain_timeout_s + 5)
        logger.info("unloaded %s (engine exit code %s)", self.names[i], code)
        self._events.put(("unloaded", i, ""))
