"""The API worker's side of the model manager (api/engine/model_manager.py): asks it to load a
model and waits for the answer, tells it when a request ends (API workers)."""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from fornax.api.server.errors import APIError
from fornax.runtime.engine.messages import ModelCommand, ModelStates

logger = logging.getLogger(__name__)


def control_address(ipc_dir: str) -> str:
    """The model manager's ROUTER, in the first model's IPC directory."""
    return f"ipc://{ipc_dir}/models-control"


class ManagerClient:
    """One DEALER per worker to the manager's ROUTER; answers matched by query id."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future[ModelStates]] = {}
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(ModelStates)
        self._task: asyncio.Task[None] | None = None
        self._abandoned: dict[int, int] = {}  # withdrawn ensure's query id -> its model
        self._sending: set[asyncio.Future[Any]] = set()

    async def start(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(self.address)
        self._task = asyncio.create_task(self._read())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.dealer.close()
        self.ctx.term()

    async def ask(self, op: str, model: int = -1, timeout_s: float = 30.0) -> ModelStates:
        """Send a command and wait for its answer (503 when none comes in `timeout_s`). An
        `ensure` or `load` given up (timed out, cancelled) is withdrawn: the manager drops its
        waiter, and a grant that crossed the withdrawal is ended at once (never left busy)."""
        qid = next(self._ids)
        fut: asyncio.Future[ModelStates] = asyncio.get_running_loop().create_future()
        self._waiting[qid] = fut
        try:
            await self.dealer.send(self._encoder.encode(ModelCommand(qid, op, model)))
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            self._withdraw(qid, op, model, fut)
            raise APIError(503, f"the model manager did not answer {op} within {timeout_s:g} s",
                           headers={"retry-after": "5"}) from None
        except asyncio.CancelledError:
            self._withdraw(qid, op, model, fut)
            raise
        finally:
            self._waiting.pop(qid, None)

    def _withdraw(self, qid: int, op: str, model: int, fut: asyncio.Future[ModelStates]) -> None:
        """The asker stopped waiting: cancel its waiter, or end the grant it will never use."""
        if op not in ("ensure", "load"):
            return
        if fut.done() and not fut.cancelled():  # answered, but the asker was cancelled anyway
            if op == "ensure" and not fut.result().error:
                self._send(ModelCommand(-1, "end", model))
            return
        if op == "ensure":
            self._abandoned[qid] = model  # its answer may already be on the way: see _read
        self._send(ModelCommand(qid, "cancel", model))

    def _send(self, cmd: ModelCommand) -> None:
        """Send from a task of its own (the caller may be a cancelled task)."""
        task = asyncio.ensure_future(self.dealer.send(self._encoder.encode(cmd)))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def tell(self, op: str, model: int, keep_alive_s: float | None = None) -> None:
        """A command without an answer (a request's `end`)."""
        await self.dealer.send(self._encoder.encode(ModelCommand(-1, op, model, keep_alive_s)))

    async def _read(self) -> None:
        while True:
            payload = await self.dealer.recv()
            try:
                msg = self._decoder.decode(payload)
            except msgspec.DecodeError:
                logger.exception("undecodable answer from the model manager")
                continue
            model = self._abandoned.pop(msg.query_id, None)
            if model is not None:  # the grant or the cancel's answer of a withdrawn ensure
                if not msg.error:
                    self._send(ModelCommand(-1, "end", model))
                continue
            fut = self._waiting.get(msg.query_id)
            if fut is not None and not fut.done():
                fut.set_result(msg)
