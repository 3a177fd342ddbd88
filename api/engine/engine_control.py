"""The model manager's reach into one engine-core process: its memory, read from /proc, and the
sleep and wake-up commands, sent over its input socket like an API worker's (`fornax serve`
process)."""

from __future__ import annotations

import itertools
import logging
import time

import msgspec
import zmq

from fornax.runtime.engine.addresses import input_address, output_address
from fornax.runtime.engine.messages import AdminCommand, AdminResult, ClientHello, EngineMessage

logger = logging.getLogger(__name__)

CLIENT_ID = "model-manager"  # one link per engine: a new hello replaces the previous one
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


def engine_admin(ipc_dir: str, command: str, level: int = 1,
                 timeout_s: float = 600.0) -> AdminResult:
    """Run one admin command (sleep, wake_up, is_sleeping) in the engine of `ipc_dir` and wait
    for its answer; a 503 result when none comes within `timeout_s` (the engine runs it
    between two steps, so a long step delays it)."""
    ctx: zmq.Context = zmq.Context.instance()
    out_addr = output_address(ipc_dir, CLIENT_ID)
    pull = ctx.socket(zmq.PULL)
    dealer = ctx.socket(zmq.DEALER)
    qid = next(_query_ids)
    try:
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(out_addr)
        dealer.setsockopt(zmq.IDENTITY, CLIENT_ID.encode())
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(input_address(ipc_dir))
        encoder = msgspec.msgpack.Encoder()
        dealer.send(encoder.encode(ClientHello(CLIENT_ID, out_addr)))
        dealer.send(encoder.encode(AdminCommand(qid, command, level)))
        decoder = msgspec.msgpack.Decoder(EngineMessage)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not pull.poll(int(min(left, 1.0) * 1000)):
                continue
            try:
                msg = decoder.decode(pull.recv())
            except msgspec.DecodeError:
                continue
            if isinstance(msg, AdminResult) and msg.query_id == qid:
                return msg
        return AdminResult(qid, 503, f"the engine did not finish {command} within "
                           f"{timeout_s:g} s")
    finally:
        dealer.close(linger=0)
        pull.close(linger=0)
