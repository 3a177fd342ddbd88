"""The engine-core process: ZMQ input/output threads around a busy `step()` loop (engine core).

Run as `python -m fornax.runtime.engine.process` with the EngineSpec (JSON) in FORNAX_ENGINE_SPEC.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import signal
import socket
import threading
import time
import traceback
from collections import defaultdict
from typing import Any

import msgspec
import zmq

from fornax.api.server.logging_setup import setup_logging
from fornax.runtime import env
from fornax.runtime.engine import fault_injection
from fornax.runtime.engine.addresses import alive_path, input_address
from fornax.runtime.engine.admin import is_sleeping, run_admin
from fornax.runtime.engine.contract import EngineCore, EngineLoad
from fornax.runtime.engine.grammar_gate import GrammarGate
from fornax.runtime.engine.heap_trim import resident_bytes, trim_heap
from fornax.runtime.engine.messages import (
    AbortRequests,
    AddRequest,
    AdminCommand,
    ClientHello,
    ClientMessage,
    EngineCoreOutput,
    EngineCoreRequest,
    EngineDead,
    EngineHandshake,
    EngineSpec,
    EngineStats,
    RequestRejected,
    StatsQuery,
)
from fornax.runtime.engine.output_thread import QUEUE_LIMIT, OutputThread
from fornax.runtime.errors import FornaxError, RequestError

logger = logging.getLogger("fornax.runtime.engine.process")

SPEC_ENV = env.ENGINE_SPEC.name
_QUEUE_LIMIT = QUEUE_LIMIT  # bounded hand-off between the socket threads and the busy loop
_IDLE_POLL_S = 0.5
_NO_LOAD = EngineLoad(num_running=0, num_waiting=0, kv_usage=0.0, prefix_cache_queries=0,
                      prefix_cache_hits=0, num_preemptions=0)  # when the numbers cannot be read


class _WorkerStalled(msgspec.Struct):
    """Internal (output thread -> busy loop): this API worker stopped reading its results."""


class EngineCoreProcess:
    """Runs one EngineCore for many API workers; never dies of a bad request."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.ctx = zmq.Context()
        self.in_q: queue.Queue[tuple[bytes, ClientMessage | _WorkerStalled]] = queue.Queue(
            _QUEUE_LIMIT)
        self.owners: dict[str, str] = {}  # engine request id -> client id
        self.stop_event = threading.Event()
        self.drain_requested = False
        self.drain_deadline: float | None = None
        self.abort_requested = False  # SIGUSR1: end every in-flight request now (`serve` asks)
        self.encoder = msgspec.msgpack.Encoder()
        self.core: EngineCore  # loaded by `run`
        self.max_queued_reqs: int | None = None  # admission bounds (set from the KV at start)
        self.max_queued_tokens: int | None = None
        # adds on their way to the busy loop: counted in by the input thread, out by the loop
        # (each counter has one writer, so no lock is needed)
        self._adds_in = self._adds_out = self._tokens_in = self._tokens_out = 0
        self.num_rejected_overload = 0
        self.num_iterations = 0  # watchdog: busy-loop progress
        self.loop_beat = time.monotonic()
        self._alive_conns: list[socket.socket] = []
        self._gate: GrammarGate | None = None  # made on the first constrained request
        self._heap_dirty = False  # steps ran since the C heap was last trimmed

    # ---- start ---------------------------------------------------------------------------------
    def run(self) -> int:
        handshake = self.ctx.socket(zmq.PUSH)
        handshake.setsockopt(zmq.LINGER, 5000)
        handshake.connect(self.spec.handshake_address)
        try:
            self.core = self._load()
        except Exception as exc:  # report any start failure to the launcher, then exit non-zero
            msg = str(exc) if isinstance(exc, FornaxError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, FornaxError):
                logger.error("engine core failed to start:\n%s", traceback.format_exc())
            handshake.send(self.encoder.encode(EngineHandshake(ready=False, error=msg)))
            handshake.close()
            return 1
        self._set_queue_limits()
        router = self._bind_sockets()
        out = OutputThread(self.ctx, self._on_worker_stall)
        out.start()
        self.out = out
        in_thread = threading.Thread(target=self._input_loop, args=(router,), name="engine-input",
                                     daemon=True)
        in_thread.start()
        # what start-up made (the model, tables, compiled code) lives as long as the process: out
        # of the cyclic GC's sight, a full collection only scans what requests made (it scanned
        # ~190k objects for SmolLM2, ~90 ms that would stall every stream at once)
        gc.collect()
        gc.freeze()
        self._trim_heap("after load")  # the load's freed temporaries back to the OS
        handshake.send(self.encoder.encode(self._ready()))
        handshake.close()
        # xgrammar (and the transformers it imports, ~50 MiB resident with the tokenizer info)
        # loads on the first constrained request, unless asked for now: a server that never
        # constrains output does not hold it (runtime/structured_output/grammar.py)
        if self.core.structured is not None and env.GRAMMAR_PREWARM.get():
            self.core.structured.prewarm()
        code = 0
        try:
            self._busy_loop()
        except Exception as exc:  # the engine itself failed: tell every worker, exit non-zero
            logger.error("engine core died:\n%s", traceback.format_exc())
            dead = EngineDead(f"the engine core died: {type(exc).__name__}: {exc}")
            self._put_out(("all", "", dead))  # encoded on the output thread
            code = 1
        self.stop_event.set()
        self.out.q.put(None)
        self.out.join(timeout=5)
        in_thread.join(timeout=2)
        router.close(linger=0)
        self.ctx.term()
        return code

    def _load(self) -> EngineCore:
        from fornax.runtime.config import make_engine_config
        from fornax.runtime.engine.factory import make_engine_core

        config = make_engine_config(self.spec.model, **self.spec.engine_kwargs).resolve()
        return make_engine_core(config)  # the core of the model's engine kind

    def _set_queue_limits(self) -> None:
        from fornax.runtime.config import queue_limits

        info = self.core.info
        self.max_queued_reqs, self.max_queued_tokens = queue_limits(
            self.core.config.scheduler_config, info.kv_capacity_tokens, info.max_model_len)
        logger.info("admission: at most %d requests in flight (--max-num-queued-reqs), %s "
                    "waiting prompt tokens (--max-num-queued-tokens); beyond them: 503",
                    self.max_queued_reqs, self.max_queued_tokens or "any number of")

    def _ready(self) -> EngineHandshake:
        info = self.core.info
        return EngineHandshake(
            max_num_queued_reqs=self.max_queued_reqs or 0,
            max_num_queued_tokens=self.max_queued_tokens or 0,
            ready=True, num_kv_blocks=info.num_kv_blocks, block_size=info.block_size,
            kv_capacity_tokens=info.kv_capacity_tokens, max_model_len=info.max_model_len,
            vocab_size=info.vocab_size, model_path=str(self.core.files.path),
            tokenizer_path=str(self.core.files.tokenizer_dir or ""),
            architecture=info.architecture, dtype=info.dtype, device=info.device,
            max_logprobs=self.core.config.max_logprobs,
            eos_token_ids=sorted(info.eos_token_ids),
            runner=self.core.runner_type, pooling=self.core.pooling_info)

    def _bind_sockets(self) -> zmq.Socket:
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(input_address(self.spec.ipc_dir))
        path = alive_path(self.spec.ipc_dir)
        if os.path.exists(path):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(64)
        threading.Thread(target=self._accept_alive, args=(listener,), name="engine-alive",
                         daemon=True).start()
        return router

    def _accept_alive(self, listener: socket.socket) -> None:
        """Hold every worker's liveness connection open; the kernel closes them when we exit."""
        while True:
            conn, _ = listener.accept()
            self._alive_conns.append(conn)

    # ---- threads -------------------------------------------------------------------------------
    def _input_loop(self, router: zmq.Socket) -> None:
        decoder = msgspec.msgpack.Decoder(ClientMessage)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        while not self.stop_event.is_set():
            self._settle_grammar()
            if not poller.poll(200):
                continue
            identity, payload = router.recv_multipart()[:2]
            try:
                msg = decoder.decode(payload)
            except msgspec.DecodeError as exc:
                logger.warning("dropping an undecodable message from a worker: %s", exc)
                continue
            try:
                self._take(identity, msg)
            except Exception as exc:  # noqa: BLE001 - a bug here must not end admission
                logger.exception("the input thread failed on a %s", type(msg).__name__)
                if isinstance(msg, AddRequest):
                    self._put_out(("rejected", identity.decode(), RequestRejected(
                        msg.request.request_id, "internal error while admitting the request: "
                        f"{type(exc).__name__}", None, 500)))

    def _take(self, identity: bytes, msg: ClientMessage) -> None:
        """Input thread: one decoded message from a worker."""
        if isinstance(msg, StatsQuery):  # answered here: a long step must not delay it
            self._put_out(("send", identity.decode(), self._stats(msg.query_id)))
        elif isinstance(msg, ClientHello):  # here too, so it is ahead of any answer
            self._handle(identity, msg)
        elif isinstance(msg, AddRequest):
            if fault_injection.INJECTOR is not None:
                fault_injection.INJECTOR.check("input", msg.request.request_id)
            self._admit(identity, msg)
        else:
            if isinstance(msg, AbortRequests) and self._gate is not None:
                self._gate.abort(msg.request_ids)  # those still waiting for a grammar
            self.in_q.put((identity, msg))  # aborts, admin: back-pressure, never dropped

    def _admit(self, identity: bytes, msg: AddRequest) -> None:
        """Input thread: refuse at once (503) beyond the admission bounds, else queue the add."""
        req = msg.request
        reason = self._overloaded(req)
        if reason is None:
            self._adds_in += 1
            self._tokens_in += len(req.prompt_token_ids)
            if self._precompile(identity, msg):
                return  # held while its grammar compiles: the gate queues or refuses it
            try:
                self.in_q.put_nowait((identity, msg))
                return
            except queue.Full:
                self._adds_in -= 1
                self._tokens_in -= len(req.prompt_token_ids)
                reason = "the server is overloaded: the engine's input queue is full; retry later"
        self.num_rejected_overload += 1
        self._put_out(("rejected", identity.decode(),
                       RequestRejected(req.request_id, reason, None, 503)))

    def _overloaded(self, req: EngineCoreRequest, pending: bool = True) -> str | None:
        """Why `req` must wait outside (the bounds are full), or None. `pending`: count the adds
        still on their way to the busy loop (the input thread's view)."""
        sched = self.core.scheduler
        in_flight = sched.num_waiting + sched.num_running
        tokens = sched.num_waiting_prompt_tokens
        if pending:
            in_flight += max(0, self._adds_in - self._adds_out)
            tokens += max(0, self._tokens_in - self._tokens_out)
        if self.max_queued_reqs is not None and in_flight >= self.max_queued_reqs:
            return (f"the server is overloaded: {in_flight} requests are in flight, the most it "
                    f"takes (--max-num-queued-reqs {self.max_queued_reqs}); retry later")
        size = len(req.prompt_token_ids)
        if self.max_queued_tokens is not None and tokens and tokens + size > self.max_queued_tokens:
            return (f"the server is overloaded: {tokens} prompt tokens are waiting and this "
                    f"request's {size} would pass --max-num-queued-tokens "
                    f"{self.max_queued_tokens}; retry later")
        return None

    def _stats(self, query_id: int) -> EngineStats:
        """Engine numbers plus the watchdog's; read from any thread (counters and lengths only)."""
        try:
            numbers = self.core.stats()
        except Exception:  # noqa: BLE001 - a racing mutation: the liveness fields still go out
            logger.debug("stats failed", exc_info=True)
            numbers = _NO_LOAD
        return EngineStats(query_id, draining=self.drain_requested,
                           num_iterations=self.num_iterations,
                           loop_stall_s=max(0.0, time.monotonic() - self.loop_beat),
                           num_rejected_overload=self.num_rejected_overload, **numbers)

    def _on_worker_stall(self, client_id: str) -> None:
        """Output thread: a worker reads nothing; have the busy loop fail its requests."""
        try:
            self.in_q.put_nowait((client_id.encode(), _WorkerStalled()))
        except queue.Full:  # the output thread tries again after another stall period
            logger.warning("could not queue the failing of API worker %s's requests", client_id)

    def _precompile(self, identity: bytes, msg: AddRequest) -> bool:
        """Input thread: start compiling a request's output constraint, never waiting for it.
        True when the grammar gate holds the request: it reaches the busy loop once its grammar
        is compiled and cached (so neither thread waits on xgrammar), or is refused (400 too
        complex / invalid, 503 busy) through `_settle_grammar`."""
        if msg.request.sampling_params.structured_outputs is None:
            return False
        if self._gate is None:
            if self.core.structured is None:
                return False
            self._gate = GrammarGate(self.core.structured, self._forward_compiled)
        held = self._gate.admit(identity, msg)
        self._settle_grammar()
        return held

    def _forward_compiled(self, identity: bytes, msg: AddRequest) -> bool:
        """Any thread: a held request whose grammar compiled goes to the busy loop."""
        try:
            self.in_q.put_nowait((identity, msg))
            return True
        except queue.Full:
            return False

    def _settle_grammar(self) -> None:
        """Input thread: requests the gate refused or dropped leave the in-flight count (the
        input thread writes it); the refused get their error."""
        if self._gate is None:
            return
        for identity, msg, rejection in self._gate.settle():
            self._adds_in -= 1
            self._tokens_in -= len(msg.request.prompt_token_ids)
            if rejection is not None:
                self._put_out(("rejected", identity.decode(), rejection))

    def _put_out(self, item: tuple[str, str, object]) -> None:
        self.out.q.put(item)

    def _trim_heap(self, when: str) -> None:
        """Return the C heap's free pages (load temporaries, a busy period's activations) to
        the OS: once after load and once each time the loop falls idle after steps."""
        self._heap_dirty = False
        before = resident_bytes()
        took = trim_heap()
        after = resident_bytes()
        if took is not None and before is not None and after is not None:
            logger.log(logging.INFO if when == "after load" else logging.DEBUG,
                       "heap trimmed %s in %.1f ms: resident %.0f -> %.0f MiB", when,
                       took * 1e3, before / 2**20, after / 2**20)

    # ---- busy loop -----------------------------------------------------------------------------
    def _busy_loop(self) -> None:
        core = self.core
        while True:
            busy = core.has_unfinished_requests()
            self._take_input(block=not busy)
            if self.drain_requested and self._drain_step():
                return
            if os.getppid() != self.spec.parent_pid:
                logger.warning("fornax serve went away; engine core exits")
                return
            if core.has_unfinished_requests():
                self._route(core.step())
                self._heap_dirty = True

    def _take_input(self, block: bool) -> None:
        self.loop_beat = time.monotonic()  # the watchdog's heartbeat: once per loop iteration
        self.num_iterations += 1
        if fault_injection.INJECTOR is not None:  # test-only: the "stall" stage sleeps here
            fault_injection.INJECTOR.stall(list(self.core.scheduler.requests))
        try:
            item = self.in_q.get(timeout=_IDLE_POLL_S) if block else self.in_q.get_nowait()
        except queue.Empty:
            if block and self._heap_dirty:  # idle for _IDLE_POLL_S after steps ran
                self._trim_heap("idle")
            return
        while True:
            self._handle(*item)
            try:
                item = self.in_q.get_nowait()
            except queue.Empty:
                return

    def _drain_step(self) -> bool:
        """SIGTERM: stop admitting, let running requests finish until the deadline, then abort."""
        now = time.monotonic()
        if self.drain_deadline is None:
            self.drain_deadline = now + self.spec.drain_timeout_s
            logger.info("draining: %d requests in flight, up to %.0f s",
                        len(self.core.scheduler.requests), self.spec.drain_timeout_s)
        if (now >= self.drain_deadline or self.abort_requested) \
                and self.core.has_unfinished_requests():
            ids = list(self.core.scheduler.requests)
            logger.warning("%s: aborting %d requests", "shutting down now" if self.abort_requested
                           else "drain timeout", len(ids))
            self._route(self.core.abort_requests(ids))
        return not self.core.has_unfinished_requests()

    def _handle(self, identity: bytes, msg: ClientMessage | _WorkerStalled) -> None:
        client_id = identity.decode()
        if isinstance(msg, AddRequest):
            self._add(client_id, msg)
        elif isinstance(msg, AbortRequests):
            self._route(self.core.abort_requests(msg.request_ids))
            for rid in msg.request_ids:
                self.owners.pop(rid, None)
        elif isinstance(msg, StatsQuery):
            self._put_out(("send", client_id, self._stats(msg.query_id)))
        elif isinstance(msg, _WorkerStalled):
            self._fail_worker(client_id)
        elif isinstance(msg, ClientHello):
            logger.debug("API worker %s connected", msg.client_id)
            self._put_out(("connect", client_id, msg.output_address.encode()))
        elif isinstance(msg, AdminCommand):  # dev endpoints: runs between steps
            self._put_out(("send", client_id, run_admin(self.core, msg)))  # encoded there

    def _fail_worker(self, client_id: str) -> None:
        """Abort (KV freed) every request of a worker that stopped reading; each gets a 503."""
        ids = [rid for rid, owner in self.owners.items() if owner == client_id]
        if not ids:
            return
        logger.error("aborting %d requests of API worker %s: it stopped reading results",
                     len(ids), client_id)
        self.core.abort_requests(ids)
        for rid in ids:
            del self.owners[rid]
            self._put_out(("rejected", client_id, RequestRejected(
                rid, "the request was aborted: its API worker stopped reading results", None,
                503)))

    def _add(self, client_id: str, msg: AddRequest) -> None:
        req = msg.request
        self._adds_out += 1  # no longer on its way (see _admit)
        self._tokens_out += len(req.prompt_token_ids)
        rejection: RequestRejected | None = None
        if self.drain_requested:
            rejection = RequestRejected(req.request_id, "the server is shutting down", None, 503)
        elif is_sleeping(self.core):
            rejection = RequestRejected(req.request_id, "the model is sleeping (POST /sleep); "
                                        "POST /wake_up first", None, 503)
        elif (reason := self._overloaded(req, pending=False)) is not None:
            rejection = RequestRejected(req.request_id, reason, None, 503)
        else:
            try:
                self.core.add_request(req)
                self.owners[req.request_id] = client_id
                return
            except RequestError as exc:
                rejection = RequestRejected(req.request_id, str(exc), exc.param, 400)
            except (ValueError, TypeError) as exc:
                rejection = RequestRejected(req.request_id, f"invalid request: {exc}", None, 400)
            except Exception as exc:  # a bug, not the client's fault; the engine lives on
                logger.exception("add_request failed for %s", req.request_id)
                rejection = RequestRejected(
                    req.request_id, f"internal error while admitting request {req.request_id}: "
                    f"{type(exc).__name__}: {exc}", None, 500)
        self._put_out(("rejected", client_id, rejection))

    def _route(self, outputs: list[EngineCoreOutput]) -> None:
        by_client: dict[str, list[EngineCoreOutput]] = defaultdict(list)
        for out in outputs:
            owner = self.owners.get(out.request_id)
            if owner is None:
                continue
            if out.error is not None:  # it failed while being served: its client gets the error
                del self.owners[out.request_id]
                self._put_out(("rejected", owner, RequestRejected(
                    out.request_id, out.error, out.error_param, out.error_status)))
                continue
            by_client[owner].append(out)
            if out.finish_reason is not None:
                del self.owners[out.request_id]
        for client_id, outs in by_client.items():
            self._put_out(("outputs", client_id, outs))  # encoded on the output thread


def main() -> None:
    setup_logging("EngineCore")
    spec = msgspec.json.decode((env.ENGINE_SPEC.get() or "").encode(), type=EngineSpec)
    proc = EngineCoreProcess(spec)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; `serve` decides

    def on_sigterm(signum: int, frame: Any) -> None:
        proc.drain_requested = True

    def on_sigusr1(signum: int, frame: Any) -> None:  # drain no longer: abort what runs now
        proc.abort_requested = proc.drain_requested = True

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGUSR1, on_sigusr1)
    code = proc.run()
    from fornax.runtime.structured_output.grammar_pool import exit_process

    exit_process(code)  # at once: helper threads (xgrammar's prewarm, compiles) are not waited


if __name__ == "__main__":
    main()
