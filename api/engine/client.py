"""Async client of the engine core: sends requests, merges results per request (API worker)."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import math
import os
import time
import uuid
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from fornax.api.server.errors import APIError, EngineDeadError, overloaded
from fornax.runtime.engine.addresses import alive_path, input_address, output_address
from fornax.runtime.engine.messages import (
    AbortRequests,
    AddRequest,
    AdminCommand,
    AdminResult,
    ClientHello,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineDead,
    EngineMessage,
    EngineStats,
    RequestRejected,
    StatsQuery,
)
from fornax.runtime.engine.output_merge import merge_output

logger = logging.getLogger(__name__)

DEADLINE_HEADER = "x-request-timeout"  # seconds a request may take in all (it may only shorten)
# the current HTTP request's deadline (time.monotonic()), set by the app before its handler runs
REQUEST_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "fornax_request_deadline", default=None)


def request_deadline(header: str | None, default_s: float | None,
                     now: float | None = None) -> float | None:
    """The deadline of a request arriving `now`: the server's --request-timeout, shortened by an
    X-Request-Timeout header (seconds). A malformed header is a 400."""
    timeout = default_s
    if header is not None:
        try:
            asked = float(header)
        except ValueError:
            asked = math.nan
        if not math.isfinite(asked) or asked <= 0:
            raise APIError(400, f"the {DEADLINE_HEADER} header must be a positive number of "
                           f"seconds, got {header[:40]!r}", DEADLINE_HEADER)
        timeout = asked if timeout is None else min(asked, timeout)
    if timeout is None:
        return None
    return (time.monotonic() if now is None else now) + timeout


def deadline_exceeded(timeout_s: float | None) -> APIError:
    what = f" of {timeout_s:g} s" if timeout_s is not None else ""
    return APIError(504, f"the request did not finish within its deadline{what} (--request-timeout"
                    f" or the {DEADLINE_HEADER} header) and was aborted", type="TimeoutError")


REVIVE_POLL_S = 0.5  # a dead engine's liveness socket is tried this often (many-model servers)
REVIVE_TIMEOUT_S = 30.0


class RequestGroup:
    """The engine requests behind one API request; outputs wait here merged (one slot each).

    With a `deadline` (time.monotonic()), `next()` raises 504 once it passes; the caller's
    clean-up (release/abort) then frees the requests' KV in the engine."""

    def __init__(self, request_ids: list[str], deadline: float | None = None) -> None:
        self.request_ids = request_ids
        self.unfinished = set(request_ids)
        self.pending: dict[str, EngineCoreOutput] = {}
        self.error: APIError | None = None
        self.deadline = deadline
        self._timeout_s = None if deadline is None else max(0.0, deadline - time.monotonic())
        self._event = asyncio.Event()
        self._deliver_before_error = False  # outputs that came before a request's failure

    def put(self, out: EngineCoreOutput) -> None:
        held = self.pending.get(out.request_id)
        if held is None:
            self.pending[out.request_id] = out
        else:
            merge_output(held, out)
        if out.finish_reason is not None:
            self.unfinished.discard(out.request_id)
        self._event.set()

    def fail(self, error: APIError, deliver_pending: bool = False) -> None:
        """Fail the group; with `deliver_pending`, the next `next()` still returns what arrived
        before the failure (a stream shows those tokens, then the error event)."""
        if self.error is None:
            self.error = error
            self._deliver_before_error = deliver_pending and bool(self.pending)
        self._event.set()

    @property
    def finished(self) -> bool:
        return not self.unfinished and not self.pending

    async def next(self) -> list[EngineCoreOutput]:
        """Everything that arrived since the last call (waits for something); raises on failure
        (and 504 past the deadline, even while outputs keep coming)."""
        while not self.pending and self.error is None:
            self._event.clear()
            if self.deadline is None:
                await self._event.wait()
                continue
            try:
                await asyncio.wait_for(self._event.wait(), self.deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
        if self.error is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.error = deadline_exceeded(self._timeout_s)
        if self.error is not None and not self._deliver_before_error:
            raise self.error
        self._deliver_before_error = False
        outs = list(self.pending.values())
        self.pending.clear()
        return outs


class EngineClient:
    """One per API worker: a DEALER to the engine's ROUTER, a PULL for results, a liveness pipe."""

    def __init__(self, ipc_dir: str, request_timeout_s: float | None = None) -> None:
        self.ipc_dir = ipc_dir
        # many-model servers restart a dead engine (serve.py): reconnect once it is back
        self.revive = False
        self.managed = False  # the model manager stops it when idle: its exit is no error
        self._reader: asyncio.Task[None] | None = None
        self._alive = asyncio.Event()
        self.request_timeout_s = request_timeout_s  # --request-timeout (None: no deadline)
        self._recent: tuple[float, EngineStats] | None = None  # recent_stats' cache
        self._stats_query: asyncio.Future[EngineStats] | None = None
        self.client_id = f"w{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.groups: dict[str, RequestGroup] = {}
        self.queries: dict[int, asyncio.Future[Any]] = {}  # StatsQuery / AdminCommand answers
        self._query_ids = itertools.count()
        self.dead_reason: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(EngineMessage)

    @property
    def dead(self) -> bool:
        return self.dead_reason is not None

    async def start(self, timeout_s: float = 30.0, loaded: bool = True) -> None:
        """Connect to the engine; a managed model that is not `loaded` waits for its engine
        (its requests first ask the model manager to load it)."""
        self.ctx = zmq.asyncio.Context()
        if loaded:
            await self._connect(timeout_s)
        else:
            self.dead_reason = "not loaded"
        self._tasks.append(asyncio.create_task(self._watch_alive()))

    async def wait_alive(self, timeout_s: float) -> None:
        """Until the worker is connected to a (re)started engine; 503 after `timeout_s`."""
        try:
            await asyncio.wait_for(self._alive.wait(), timeout_s)
        except asyncio.TimeoutError:
            raise EngineDeadError(f"the engine core did not come back within {timeout_s:g} s: "
                                  f"{self.dead_reason}") from None

    async def _connect(self, timeout_s: float) -> None:
        """Sockets to the engine, the hello, the read loop, and one round trip."""
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        out_addr = output_address(self.ipc_dir, self.client_id)
        self.pull.bind(out_addr)
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.IDENTITY, self.client_id.encode())
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(input_address(self.ipc_dir))
        await self._send(ClientHello(self.client_id, out_addr))
        self._reader = asyncio.create_task(self._read_loop())
        self._tasks.append(self._reader)
        await self.stats(timeout_s)  # a round trip: both directions work
        self._alive.set()

    async def _reconnect(self) -> None:
        """A restarted engine on the same IPC directory: new sockets and hello, then alive."""
        if self._reader is not None:
            self._reader.cancel()
            self._tasks.remove(self._reader)
            self.dealer.close()
            self.pull.close()
        self.client_id = f"w{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._recent = None
        reason, self.dead_reason = self.dead_reason, None
        try:
            await self._connect(REVIVE_TIMEOUT_S)
        except Exception:
            self.dead_reason = reason
            raise
        logger.info("engine core %s is back; serving again", self.ipc_dir)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._reader is not None:
            self.dealer.close()
            self.pull.close()
        self.ctx.term()

    # ---- requests ------------------------------------------------------------------------------
    async def add(self, requests: list[EngineCoreRequest]) -> RequestGroup:
        if self.dead:
            raise EngineDeadError(self.dead_reason or "the engine core is not running")
        try:
            payloads = [self._encoder.encode(AddRequest(req)) for req in requests]
        except (msgspec.EncodeError, OverflowError) as exc:  # e.g. an integer beyond 64 bits
            raise APIError(400, f"a number in the request is out of range: {exc}") from None
        deadline = REQUEST_DEADLINE.get()
        if deadline is None and self.request_timeout_s is not None:  # outside an HTTP request
            deadline = time.monotonic() + self.request_timeout_s
        group = RequestGroup([r.request_id for r in requests], deadline)
        for req in requests:
            self.groups[req.request_id] = group
        for payload in payloads:
            await self.dealer.send(payload)
        return group

    async def abort(self, request_ids: list[str]) -> None:
        ids = [rid for rid in request_ids if self.groups.pop(rid, None) is not None]
        if ids and not self.dead:
            await self._send(AbortRequests(ids))

    async def release(self, group: RequestGroup) -> None:
        """Forget a group; abort whatever in it has not finished (client gone, stop string...)."""
        await self.abort([rid for rid in group.request_ids if rid in self.groups])

    async def stats(self, timeout_s: float = 5.0) -> EngineStats:
        if self.dead:
            raise EngineDeadError(self.dead_reason or "the engine core is not running")
        qid = next(self._query_ids)
        fut: asyncio.Future[EngineStats] = asyncio.get_running_loop().create_future()
        self.queries[qid] = fut
        try:
            await self._send(StatsQuery(qid))
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError as exc:
            raise APIError(503, "the engine core did not answer in time") from exc
        finally:
            self.queries.pop(qid, None)

    async def recent_stats(self, max_age_s: float = 1.0, timeout_s: float = 5.0) -> EngineStats:
        """An answer at most `max_age_s` old; concurrent callers share one query (/health)."""
        cached = self._recent
        if cached is not None and time.monotonic() - cached[0] <= max_age_s:
            return cached[1]
        if self._stats_query is None or self._stats_query.done():
            self._stats_query = asyncio.ensure_future(self.stats(timeout_s))
            self._stats_query.add_done_callback(_consume_exception)
        stats = await asyncio.shield(self._stats_query)
        self._recent = (time.monotonic(), stats)
        return stats

    async def admin(self, command: str, level: int = 1, timeout_s: float = 600.0) -> AdminResult:
        """Run a dev-endpoint command in the engine (sleep, wake_up, ...) and wait for it."""
        if self.dead:
            raise EngineDeadError(self.dead_reason or "the engine core is not running")
        qid = next(self._query_ids)
        fut: asyncio.Future[AdminResult] = asyncio.get_running_loop().create_future()
        self.queries[qid] = fut
        try:
            await self._send(AdminCommand(qid, command, level))
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError as exc:
            raise APIError(503, f"the engine core did not finish {command} in time") from exc
        finally:
            self.queries.pop(qid, None)

    async def _send(self, msg: object) -> None:
        await self.dealer.send(self._encoder.encode(msg))

    # ---- incoming ------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        while True:
            payload = await self.pull.recv()
            try:
                msg = self._decoder.decode(payload)
            except msgspec.DecodeError:
                logger.exception("undecodable message from the engine core")
                continue
            try:
                if isinstance(msg, EngineCoreOutputs):
                    self._dispatch(msg)
                elif isinstance(msg, (EngineStats, AdminResult)):
                    fut = self.queries.get(msg.query_id)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                elif isinstance(msg, EngineDead):
                    self._mark_dead(msg.message)
            except Exception:  # a bug here must not silence every later result
                logger.exception("failed to dispatch a message from the engine core")

    def _dispatch(self, msg: EngineCoreOutputs) -> None:
        for out in msg.outputs:
            group = self.groups.get(out.request_id)
            if group is None:
                continue
            group.put(out)
            if out.finish_reason is not None:
                del self.groups[out.request_id]
        for rej in msg.rejected:
            group = self.groups.pop(rej.request_id, None)
            if group is not None:
                group.fail(_rejection_error(rej), deliver_pending=True)

    async def _watch_alive(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(alive_path(self.ipc_dir))
            except OSError as exc:
                self._mark_dead(f"cannot reach the engine core: {exc}")
                if not self.revive:
                    return
                await asyncio.sleep(REVIVE_POLL_S)  # until the restarted engine listens
                continue
            if self.dead:
                # this may be the listener of an engine still exiting: after the reconnect (an
                # engine answered), watch the socket anew, the one of the engine that answered
                writer.close()
                try:
                    await self._reconnect()
                except Exception as exc:  # noqa: BLE001 - dead again: keep waiting
                    logger.warning("reconnecting to engine core %s failed: %s", self.ipc_dir,
                                   exc)
                    self.dead_reason = self.dead_reason or f"reconnecting failed: {exc}"
                    await asyncio.sleep(REVIVE_POLL_S)
                continue
            try:
                await reader.read(1)  # the engine never writes: this returns at its exit
            except OSError:  # reset: gone as well
                pass
            finally:
                writer.close()
            self._mark_dead("the engine core process exited")
            if not self.revive:
                return

    def _mark_dead(self, reason: str) -> None:
        if self.dead:
            return
        self.dead_reason = reason
        self._alive.clear()
        logger.log(logging.INFO if self.managed else logging.ERROR,
                   "engine core is dead (%s); failing %d in-flight requests", reason,
                   len(self.groups))
        error = EngineDeadError(f"the engine core is not running: {reason}")
        for group in set(self.groups.values()):
            group.fail(error)
        self.groups.clear()
        for fut in self.queries.values():
            if not fut.done():
                fut.set_exception(error)


def _consume_exception(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: no "exception was never retrieved" warning


def _rejection_error(rej: RequestRejected) -> APIError:
    if rej.status == 503:
        return overloaded(rej.message)
    return APIError(rej.status, rej.message, rej.param)
