"""The model manager's reach into one engine-core process: its memory, read from /proc, and the
sleep and wake-up commands, sent over its input socket like an API worker's (`fornax serve`
process)."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable

import msgspec
import zmq

from fornax.runtime.engine.addresses import input_address, output_address
from fornax.runtime.engine.messages import AdminCommand, AdminResult, ClientHello, EngineMessage

logger = logging.getLogger(__name__)

_query_ids = itertools.count(1)


def process_memory(pid: int) -> tuple[int, int]:
    """(resident bytes now, peak resident bytes) of a process (VmRSS, VmHWM); (0, 0) once it is
    gone or where /proc has no such fields."""
    rss = peak = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    return rss, max(rss, peak)


class EngineLink:
    """The manager's link to one engine process, as an API worker's: a DEALER to its input
    ROUTER and a PULL for its answers, named after the process (`pid`), so the engine holds one
    link per manager and process however often it sleeps and wakes. Used by one thread at a
    time (the model's state allows one sleep or wake-up at once)."""

    def __init__(self, ipc_dir: str, pid: int) -> None:
        self.pid = pid
        client_id = f"model-manager-{pid}"
        ctx: zmq.Context = zmq.Context.instance()
        out_addr = output_address(ipc_dir, client_id)
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.bind(out_addr)
        self.dealer = ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.IDENTITY, client_id.encode())
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(input_address(ipc_dir))
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(EngineMessage)
        self.dealer.send(self._encoder.encode(ClientHello(client_id, out_addr)))

    def admin(self, command: str, level: int = 1, timeout_s: float = 600.0,
              alive: Callable[[], bool] | None = None) -> AdminResult:
        """Run one admin command (sleep, wake_up, is_sleeping) in the engine and wait for its
        answer; a 503 result when none comes within `timeout_s` (the engine runs it between
        two steps, so a long step delays it), or at once when `alive()` says the engine died."""
        qid = next(_query_ids)
        self.dealer.send(self._encoder.encode(AdminCommand(qid, command, level)))
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self.pull.poll(int(min(left, 1.0) * 1000)):
                if alive is not None and not alive():
                    return AdminResult(qid, 503, f"the engine exited during {command}")
                continue
            try:
                msg = self._decoder.decode(self.pull.recv())
            except msgspec.DecodeError:
                continue
            if isinstance(msg, AdminResult) and msg.query_id == qid:
                return msg
        return AdminResult(qid, 503, f"the engine did not finish {command} within "
                           f"{timeout_s:g} s")

    def close(self) -> None:
        self.dealer.close(linger=0)
        self.pull.close(linger=0)
