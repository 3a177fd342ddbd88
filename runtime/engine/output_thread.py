"""The engine core's output thread: encodes and sends results to the API workers, never dropping
one (engine-core process).

The busy loop hands over structs; this thread encodes them and sends without blocking. When a
worker's socket is full (it reads slower than the engine writes), its outputs wait here merged in
one slot per request (see output_merge), so what waits is bounded by its requests, not by steps,
and every final message still goes out once the worker reads again. A worker that reads nothing
for `stall_s` seconds has its requests failed: the engine aborts them (KV freed) and each gets a
final output carrying an error, delivered if the worker ever reads again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec
import zmq

from fornax.runtime.engine.messages import EngineCoreOutput, EngineCoreOutputs, RequestRejected
from fornax.runtime.engine.output_merge import merge_output

logger = logging.getLogger(__name__)

QUEUE_LIMIT = 65536  # items from the busy loop not yet taken by this thread
SEND_HWM = 1000  # messages ZMQ queues per worker before a send would block
WORKER_STALL_S = 30.0  # a worker whose socket stays full this long has its requests failed
MAX_CONTROL = 1024  # unsent stats/admin answers kept per worker (the oldest go first)
_RETRY_S = 0.002  # how soon a blocked send is tried again
_PARKED_RETRY_S = 1.0  # the same for a worker that stalled (it may be gone for good)


@dataclass
class _Link:
    """One API worker: its socket and what could not be sent to it yet."""

    sock: zmq.Socket
    slots: dict[str, EngineCoreOutput] = field(default_factory=dict)  # request id -> merged
    rejected: list[RequestRejected] = field(default_factory=list)
    control: deque[bytes] = field(default_factory=lambda: deque(maxlen=MAX_CONTROL))
    blocked_since: float | None = None
    parked: bool = False  # stalled: retried once a second, not every _RETRY_S

    @property
    def pending(self) -> bool:
        return bool(self.slots or self.rejected or self.control)


class OutputThread(threading.Thread):
    """Owns the PUSH sockets to the API workers. Items on `q`:

    ("connect", client_id, address) · ("outputs", client_id, [EngineCoreOutput]) ·
    ("rejected", client_id, RequestRejected) · ("send", client_id, struct or bytes) for answers ·
    ("all", "", struct or bytes) to every worker · None to stop.

    `on_stall(client_id)` runs on this thread when a worker stopped reading; it must
    not block (the engine core queues an abort for its busy loop).
    """

    def __init__(self, ctx: zmq.Context, on_stall: Callable[[str], None] | None = None, *,
                 send_hwm: int = SEND_HWM, stall_s: float = WORKER_STALL_S) -> None:
        super().__init__(name="engine-output", daemon=True)
        self.ctx = ctx
        self.q: queue.Queue[tuple[str, str, Any] | None] = queue.Queue(QUEUE_LIMIT)
        self.links: dict[str, _Link] = {}
        self.on_stall = on_stall
        self.send_hwm = send_hwm
        self.stall_s = stall_s
        self.encoder = msgspec.msgpack.Encoder()
        self.num_blocked_sends = 0  # how often a send had to wait (back-pressure, not a drop)

    def run(self) -> None:
        while True:
            pending = [link for link in self.links.values() if link.pending]
            timeout = None if not pending else \
                _PARKED_RETRY_S if all(link.parked for link in pending) else _RETRY_S
            item: tuple[str, str, Any] | tuple[()] | None
            try:
                item = self.q.get(timeout=timeout)
            except queue.Empty:
                item = ()
            if item is None:
                break
            stop = False
            while item:  # take everything queued, then send once per worker
                self._take(item)
                try:
                    item = self.q.get_nowait()
                except queue.Empty:
                    item = ()
                if item is None:
                    stop = True
                    break
            self._flush_all()
            if stop:
                break
        self._flush_all()
        for link in self.links.values():
            link.sock.close()

    # ---- items ---------------------------------------------------------------------------------
    def _take(self, item: tuple[str, str, Any]) -> None:
        kind, client_id, payload = item
        if kind == "connect":
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 2000)
            sock.setsockopt(zmq.SNDHWM, self.send_hwm)
            sock.connect(payload.decode() if isinstance(payload, bytes) else payload)
            self.links[client_id] = _Link(sock)
            return
        if kind == "all":
            data = self._encode(payload)
            for each in self.links.values():
                each.control.append(data)
            return
        link = self.links.get(client_id)
        if link is None:
            logger.warning("a message for unknown API worker %s is dropped", client_id)
            return
        if kind == "outputs":
            for out in payload:
                held = link.slots.get(out.request_id)
                if held is None:
                    link.slots[out.request_id] = out
                else:
                    merge_output(held, out)
        elif kind == "rejected":
            link.rejected.append(payload)
        else:
            link.control.append(self._encode(payload))

    def _encode(self, payload: Any) -> bytes:
        return payload if isinstance(payload, bytes) else self.encoder.encode(payload)

    # ---- sending -------------------------------------------------------------------------------
    def _flush_all(self) -> None:
        now = time.monotonic()
        for client_id, link in self.links.items():
            if link.pending and not self._flush(link):
                if link.blocked_since is None:
                    link.blocked_since = now
                    self.num_blocked_sends += 1
                elif now - link.blocked_since >= self.stall_s:
                    self._stalled(client_id, link)
                    link.blocked_since = now  # fail again only after another full period
                    link.parked = True
            else:
                link.blocked_since = None
                link.parked = False

    def _flush(self, link: _Link) -> bool:
        """Send what waits for this worker; False if its socket is full (the rest stays)."""
        if not cast(int, link.sock.getsockopt(zmq.EVENTS)) & zmq.POLLOUT:
            return False  # still full: do not even encode
        while link.control:
            if not self._send(link.sock, link.control[0]):
                return False
            link.control.popleft()
        if link.slots or link.rejected:
            data = self.encoder.encode(EngineCoreOutputs(list(link.slots.values()),
                                                         list(link.rejected)))
            if not self._send(link.sock, data):
                return False
            link.slots.clear()
            link.rejected.clear()
        return True

    @staticmethod
    def _send(sock: zmq.Socket, data: bytes) -> bool:
        try:
            sock.send(data, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _stalled(self, client_id: str, link: _Link) -> None:
        logger.error("API worker %s read no results for %.0f s: failing its requests",
                     client_id, self.stall_s)
        link.control.clear()  # stale stats/admin answers: their askers have timed out
        if self.on_stall is not None:
            self.on_stall(client_id)
