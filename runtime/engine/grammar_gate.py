"""Holds a new request while its output constraint compiles and hands it to the busy loop only
once the grammar is cached, so neither the input thread nor the loop waits on xgrammar
(engine-core process)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from fornax.runtime.engine.messages import AddRequest, RequestRejected
from fornax.runtime.errors import RequestError

if TYPE_CHECKING:
    from fornax.runtime.sampling.params import StructuredOutputsParams
    from fornax.runtime.structured_output.grammar import StructuredOutputManager
    from fornax.runtime.structured_output.grammar_pool import CompileJob

logger = logging.getLogger(__name__)


class GrammarGate:
    """`admit` on the input thread: a request whose grammar is cached (or that has none) goes on
    at once; one whose grammar is compiling waits here (not scheduled, other requests run on)
    and is forwarded to the busy loop when the compile ends, or refused: 400 "grammar too
    complex" / invalid constraint, 503 when the compile pool, this gate or the busy loop's
    queue is full. An abort of a waiting request drops it here. Requests that leave without
    reaching the busy loop come back to the input thread through `settle` (it runs at least
    every poll interval, 200 ms: the delay of a refusal decided on a compile thread)."""

    def __init__(self, structured: StructuredOutputManager,
                 forward: Callable[[bytes, AddRequest], bool]) -> None:
        self.structured = structured
        self.forward = forward  # (identity, msg) -> the busy loop's queue; False when full
        self.max_waiting = structured.limits.grammar_max_waiting_requests
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[bytes, AddRequest]] = {}
        # waiting requests aborted: id -> their constraint
        self._aborted: dict[str, StructuredOutputsParams] = {}
        self._left: list[tuple[bytes, AddRequest, RequestRejected | None]] = []

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def admit(self, identity: bytes, msg: AddRequest) -> bool:
        """True when the gate took the message (it forwards or refuses it later)."""
        from fornax.runtime.structured_output.grammar import constraint_param
        from fornax.runtime.structured_output.grammar_pool import GrammarBusy

        req = msg.request
        params = req.sampling_params.structured_outputs
        if params is None:
            return False
        rid = req.request_id
        with self._lock:
            if rid in self._waiting:
                return self._leave(identity, msg, RequestRejected(
                    rid, f"request id {rid!r} is already in use", "request_id", 400))
            if len(self._waiting) >= self.max_waiting:
                return self._leave(identity, msg, RequestRejected(
                    rid, f"the server is overloaded: {self.max_waiting} requests already wait "
                    "for their grammar to compile; retry later", None, 503))
            try:
                job = self.structured.prepare(params)
            except RequestError as exc:  # refused before (a cached failure)
                return self._leave(identity, msg, RequestRejected(rid, str(exc), exc.param, 400))
            except GrammarBusy as exc:
                return self._leave(identity, msg, RequestRejected(
                    rid, f"grammar compiler busy: {exc}; retry later", constraint_param(params),
                    503))
            except Exception:  # noqa: BLE001 - a malformed constraint: add_request answers it
                logger.debug("constraint of %s not prepared", rid, exc_info=True)
                return False
            if job is None:
                return False  # cached and pinned: straight on
            self._waiting[rid] = (identity, msg)
        job.add_done_callback(partial(self._compiled, rid, params))
        return True

    def abort(self, request_ids: list[str]) -> None:
        """Waiting requests among these are dropped (their client has gone)."""
        with self._lock:
            for rid in request_ids:
                entry = self._waiting.pop(rid, None)
                if entry is not None:
                    constraint = entry[1].request.sampling_params.structured_outputs
                    if constraint is not None:  # always: only constrained requests wait here
                        self._aborted[rid] = constraint
                    self._left.append((entry[0], entry[1], None))

    def settle(self) -> list[tuple[bytes, AddRequest, RequestRejected | None]]:
        """Requests that left the gate since the last call without reaching the busy loop:
        (identity, msg, the rejection to send, or None for an aborted one)."""
        with self._lock:
            left, self._left = self._left, []
        return left

    def _leave(self, identity: bytes, msg: AddRequest, rejection: RequestRejected) -> bool:
        self._left.append((identity, msg, rejection))  # lock held
        return True

    def _compiled(self, rid: str, params: StructuredOutputsParams, job: CompileJob) -> None:
        """The compile ended (any thread): forward the request, or refuse it."""
        from fornax.runtime.structured_output.grammar import constraint_param, failure_message
        from fornax.runtime.structured_output.grammar_pool import GrammarBusy

        with self._lock:
            entry = self._waiting.pop(rid, None)
            aborted = self._aborted.pop(rid, None)
            # forwarded under the lock (a non-blocking put): an abort racing this either still
            # finds the request here or reaches the busy loop after its add, never before it
            forwarded = entry is not None and job.error is None and self.forward(*entry)
        if entry is None:
            if aborted is not None and job.error is None:
                self.structured.unpin(aborted)
            return
        identity, msg = entry
        if job.error is None:
            if forwarded:
                return
            self.structured.unpin(params)
            rejection = RequestRejected(rid, "the server is overloaded: the engine's input queue "
                                        "is full; retry later", None, 503)
        else:
            status = 503 if isinstance(job.error, GrammarBusy) else 400
            rejection = RequestRejected(rid, failure_message(params.kind, job.error),
                                        constraint_param(params), status)
        with self._lock:
            self._left.append((identity, msg, rejection))
