"""WS /v1/realtime: the ASGI WebSocket loop, API keys, session limits, protocol choice (API workers).

A connection is authenticated before it is accepted (`Authorization: Bearer`, `x-api-key`, the
`?api_key=` query or the `openai-insecure-api-key.<KEY>` subprotocol that browsers can send),
then gets vLLM's `session.created` (or OpenAI's `transcription_session.created` when it asked
for `?intent=transcription`). Its first event picks the protocol (see realtime_handlers). Bad
events get an error event and the session goes on; the session ends at the client's close, at
`--realtime-idle-timeout` without a client event, or after `--realtime-max-session-seconds`.
Whatever the session still has in the engine is aborted when it ends. When the server stops, each
open session gets the protocol's `error` event (`server_shutting_down`) and a close with 1001
(realtime/shutdown.py). Bounds: one event at most
MAX_EVENT_BYTES, the audio waiting in a session `--realtime-max-buffer-seconds` (at 16 kHz), open
sessions per worker `--realtime-max-sessions` (one more gets the protocol's `error` event, code
`session_limit_reached`, then a close with 1013: past capacity a session is turned away instead
of slowing every open one down).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import msgspec
import numpy as np

from fornax.api.realtime.handlers import OpenAIHandler, VllmHandler
from fornax.api.realtime.protocol import (
    IDLE_TIMEOUT,
    INVALID_AUDIO,
    INVALID_EVENT,
    MODEL_NOT_FOUND,
    PROCESSING_ERROR,
    SERVER_SHUTTING_DOWN,
    SESSION_EXPIRED,
    SESSION_LIMIT,
    ClientEventError,
    ErrorEvent,
    OpenAIError,
    OpenAIErrorInfo,
    encode,
    parse_event,
    session_created,
)
from fornax.api.realtime.shutdown import CLOSE_GOING_AWAY, SESSIONS, wait_idle
from fornax.api.realtime.worker import DecodeWorker
from fornax.api.routes.audio import is_transcription, whisper_info
from fornax.api.server.errors import APIError
from fornax.api.server.http import Receive, Scope, Send
from fornax.api.server.state import AppState
from fornax.audio.features import SAMPLE_RATE
from fornax.audio.streaming import StreamingTranscriber, StreamOutput, VadNotice
from fornax.runtime.loaders.speech_models import WhisperInfo

logger = logging.getLogger(__name__)

REALTIME_PATH = "/v1/realtime"
KEY_SUBPROTOCOL = "openai-insecure-api-key."
CLOSE_NORMAL, CLOSE_POLICY, CLOSE_ERROR, CLOSE_TRY_LATER = 1000, 1008, 1011, 1013


class _SessionCount:
    """Open realtime sessions of this API worker (one event loop: no lock needed)."""

    open = 0


_SESSIONS = _SessionCount()


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def offered_key(scope: Scope) -> str | None:
    """The API key a WebSocket client sent, in any of the forms browsers can send."""
    headers = _headers(scope)
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if headers.get("x-api-key"):
        return headers["x-api-key"].strip()
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if query.get("api_key"):
        return query["api_key"][-1]
    for proto in scope.get("subprotocols") or []:
        if proto.startswith(KEY_SUBPROTOCOL):
            return proto[len(KEY_SUBPROTOCOL):]
    return None


def chosen_subprotocol(scope: Scope) -> str | None:
    """The subprotocol to accept: "realtime" when offered, else the first one that carries no
    key (a key is never echoed back), else none."""
    offered = [p for p in scope.get("subprotocols") or [] if not p.startswith(KEY_SUBPROTOCOL)]
    if "realtime" in offered:
        return "realtime"
    return offered[0] if offered else None


async def websocket_endpoint(state: AppState, scope: Scope, receive: Receive, send: Send,
                             key_ok: Callable[[str], bool] | None,
                             origin_ok: Callable[[str | None], bool] | None = None) -> None:
    """Handle one WebSocket connection (`key_ok` is None when the server has no API keys). A
    browser's connection (it carries an Origin) must come from an --allowed-origins origin, as
    for HTTP: CORS does not cover WebSockets, so any web page could otherwise use the server."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if scope.get("path") != REALTIME_PATH:
        await send({"type": "websocket.close", "code": CLOSE_POLICY,
                    "reason": f"no WebSocket route {scope.get('path')}"})
        return
    origin = _headers(scope).get("origin")
    if origin is not None and origin_ok is not None and not origin_ok(origin):
        await send({"type": "websocket.close", "code": CLOSE_POLICY,
                    "reason": "this origin is not allowed (--allowed-origins)"})
        return
    if key_ok is not None:
        given = offered_key(scope)
        if given is None or not key_ok(given):
            await send({"type": "websocket.close", "code": CLOSE_POLICY,
                        "reason": "a valid API key is required"})
            return
    if state.draining or SESSIONS.stopping:
        await send({"type": "websocket.close", "code": CLOSE_TRY_LATER,
                    "reason": "the server is shutting down"})
        return
    await send({"type": "websocket.accept", "subprotocol": chosen_subprotocol(scope)})
    limit = getattr(state.settings, "realtime_max_sessions", None)
    if limit is not None and _SESSIONS.open >= limit:  # accepted first: the client sees why
        await refuse_session(scope, send, limit)
        return
    metrics = state.metrics
    metrics.ws_active.inc()
    metrics.ws_total.inc()
    start = time.monotonic()
    _SESSIONS.open += 1
    conn = RealtimeConnection(state, scope, send)
    SESSIONS.open.add(conn)  # a stopping worker closes it first (realtime/shutdown.py)
    try:
        await conn.run(receive)
    except OSError as exc:  # the transport broke while sending
        logger.debug("realtime connection broke: %s", exc)
    finally:
        SESSIONS.open.discard(conn)
        _SESSIONS.open -= 1
        metrics.ws_active.dec()
        metrics.ws_duration.observe(time.monotonic() - start)


async def refuse_session(scope: Scope, send: Send, limit: int) -> None:
    """Turn away a session past --realtime-max-sessions: the protocol's `error` event naming the
    limit (OpenAI's shape for `?intent=transcription`, else vLLM's), then close with 1013."""
    message = (f"{limit} realtime sessions are open on this server worker "
               "(--realtime-max-sessions); try again later")
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    event: msgspec.Struct = ErrorEvent(message, SESSION_LIMIT)
    if (query.get("intent") or [""])[-1] == "transcription":
        event = OpenAIError(OpenAIErrorInfo("server_error", SESSION_LIMIT, message))
    with contextlib.suppress(Exception):  # the client may be gone already
        await send({"type": "websocket.send", "text": encode(event)})
    await send({"type": "websocket.close", "code": CLOSE_TRY_LATER,
                "reason": f"{limit} realtime sessions are open (--realtime-max-sessions)"})


class RealtimeConnection:
    """One accepted realtime session."""

    def __init__(self, state: AppState, scope: Scope, send: Send) -> None:
        self.state = state
        self.settings = state.settings
        self.session_id = f"sess_{uuid.uuid4().hex[:20]}"
        self._send = send
        self._send_lock = asyncio.Lock()
        self._pending_receive: asyncio.Future[dict[str, Any]] | None = None
        self.closed = False
        self._close_sent = asyncio.Event()  # close() from another task: the frame went out
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        self.intent = (query.get("intent") or [""])[-1]
        # set by run() before any handler exists
        self.info: WhisperInfo
        self.tr: StreamingTranscriber
        self.worker: DecodeWorker
        self.handler: VllmHandler | OpenAIHandler | None = None
        self.max_buffer = int(self.settings.realtime_max_buffer_s * SAMPLE_RATE)
        # many models: a model session.update switches to is loaded and kept until the end
        self._leases = contextlib.AsyncExitStack()

    # ---- sending -------------------------------------------------------------------------------
    async def send(self, *events: msgspec.Struct) -> None:
        """Send events in order, as one group: no other task's event lands between them."""
        if self.closed:
            return
        async with self._send_lock:
            for event in events:
                try:
                    await self._send({"type": "websocket.send", "text": encode(event)})
                except Exception as exc:  # noqa: BLE001 - the client is gone; receive ends
                    logger.debug("realtime session %s: send failed: %s", self.session_id, exc)
                    self.closed = True
                    return

    async def send_error(self, code: str, message: str, param: str | None = None,
                         client_event_id: str | None = None) -> None:
        handler = self.handler or VllmHandler(self)
        await self.send(handler.error_event(code, message, param, client_event_id))

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        if self.closed:
            return
        pending = self._pending_receive
        if pending is not None and not pending.done():
            # Granian does not send the close frame while a receive() is pending
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pending  # cancelled, or the transport is gone
        async with self._send_lock:
            self.closed = True
            try:
                await self._send({"type": "websocket.close", "code": code, "reason": reason[:120]})
            except Exception as exc:  # noqa: BLE001 - already gone
                logger.debug("realtime session %s: close failed: %s", self.session_id, exc)
            finally:
                self._close_sent.set()

    async def going_away(self, wait_s: float) -> None:
        """The worker stops: the decode in flight may finish (within `wait_s`; the engine's
        drain bounds it), then the protocol's error event and a close with 1001."""
        worker = getattr(self, "worker", None)
        if worker is not None:
            await wait_idle(lambda: worker.busy, wait_s)
        await self.send_error(SERVER_SHUTTING_DOWN, "the server is shutting down; reconnect "
                              "to go on transcribing")
        await self.close(CLOSE_GOING_AWAY, "the server is shutting down")

    # ---- the session ---------------------------------------------------------------------------
    async def run(self, receive: Receive) -> None:
        state = self.state
        if not is_transcription(state):
            await self.send_error(MODEL_NOT_FOUND, f"the served model ({state.model_name}) is not "
                                  "a speech-to-text model; realtime transcription needs a "
                                  "Whisper model (e.g. fornax serve whisper-tiny.en)")
            await self.close(CLOSE_POLICY, "not a speech-to-text model")
            return
        self.info = whisper_info(state)
        self.tr = StreamingTranscriber(self.info, state.tokenizer.tokenizer,
                                       vad_kind=getattr(self.settings, "realtime_vad", "silero"))
        self.worker = DecodeWorker(state, self.tr, self.session_id, self._on_output,
                                   self._on_worker_error)
        self.worker.start()
        try:  # the worker is closed even when the client left before the session's first event
            if self.intent == "transcription":
                self.handler = OpenAIHandler(self)
                await self.handler.start()
            else:
                created = session_created()
                self.session_id = created.id
                self.worker.session_id = created.id
                await self.send(created)
            await self._receive_loop(receive)
        finally:
            if await self.worker.close():
                logger.info("realtime session %s ended with a decode in flight: aborted it in "
                            "the engine", self.session_id)
            await self._leases.aclose()

    async def _receive_loop(self, receive: Receive) -> None:
        settings = self.settings
        idle = settings.realtime_idle_timeout_s
        deadline = time.monotonic() + settings.realtime_max_session_s
        last_event = time.monotonic()
        try:
            while not self.closed:
                now = time.monotonic()
                if now >= deadline:
                    await self.send_error(SESSION_EXPIRED, "the session reached its maximum "
                                          "length (--realtime-max-session-seconds)")
                    await self.close(CLOSE_NORMAL, "session expired")
                    return
                if now - last_event >= idle:
                    if self.worker.busy or self.tr.segments:
                        last_event = now  # still transcribing: the client is waiting for us
                    else:
                        await self.send_error(IDLE_TIMEOUT, f"no event from the client for "
                                              f"{idle:g} s (--realtime-idle-timeout)")
                        await self.close(CLOSE_NORMAL, "idle timeout")
                        return
                wait = max(0.01, min(deadline, last_event + idle) - now)
                if self._pending_receive is None:
                    self._pending_receive = asyncio.ensure_future(receive())
                done, _ = await asyncio.wait({self._pending_receive}, timeout=wait)
                if not done:
                    continue
                pending, self._pending_receive = self._pending_receive, None
                if pending.cancelled():  # close() cancelled it, from another task (shutdown):
                    # the handler must not return before its close frame went out (Granian
                    # would end the connection without a status)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._close_sent.wait(), 5.0)
                    return
                message = pending.result()
                if message["type"] == "websocket.disconnect":
                    self.closed = True
                    return
                if message["type"] != "websocket.receive":
                    continue
                last_event = time.monotonic()
                await self._frame(message)
        finally:
            if self._pending_receive is not None:
                self._pending_receive.cancel()

    async def _frame(self, message: dict[str, Any]) -> None:
        text = message.get("text")
        client_event_id = None
        try:
            if text is None:
                raise ClientEventError(INVALID_EVENT, "binary frames are not accepted: send each "
                                       "event as a JSON text frame")
            event, kind = parse_event(text)
            client_event_id = event.get("event_id") if isinstance(event.get("event_id"),
                                                                  str) else None
            if self.handler is None:
                await self._choose_protocol(event, kind)
            assert self.handler is not None
            await self.handler.handle(event, kind)
        except ClientEventError as exc:
            await self.send_error(exc.code, exc.message, exc.param, client_event_id)
        except (OSError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug must not end the session or the server
            logger.exception("realtime session %s: failed to handle an event", self.session_id)
            await self.send_error(PROCESSING_ERROR, f"the server failed to handle the event: "
                                  f"{type(exc).__name__}: {exc}")

    async def _choose_protocol(self, event: dict[str, Any], kind: str) -> None:
        if kind == "transcription_session.update" or (
                kind == "session.update" and isinstance(event.get("session"), dict)):
            self.handler = OpenAIHandler(self, ga=kind == "session.update")
        else:
            self.handler = VllmHandler(self)
        logger.debug("realtime session %s speaks %s", self.session_id, self.handler.protocol)

    # ---- shared by the handlers ----------------------------------------------------------------
    async def check_model(self, model: str | None) -> None:
        try:  # many models: session.update may name another Whisper model, before any audio
            target = self.state.models.speech_model(self.state, model, self.tr.buffered_samples)
            target.resolve_model(model)
        except APIError as exc:
            raise ClientEventError(MODEL_NOT_FOUND, exc.message, "model") from None
        if target is not self.state:  # loaded now and held (never evicted) until the session ends
            await self._leases.enter_async_context(target.models.holding(target))
            self.state = self.worker.state = target
            self.info = whisper_info(target)
            self.tr = self.worker.tr = StreamingTranscriber(
                self.info, target.tokenizer.tokenizer,
                vad_kind=getattr(self.settings, "realtime_vad", "silero"))

    def append(self, samples: np.ndarray) -> list[VadNotice]:
        """Add 16 kHz audio to the session; refused beyond the buffer limit."""
        held = self.tr.buffered_samples
        if held + len(samples) > self.max_buffer:
            raise ClientEventError(
                INVALID_AUDIO, f"the audio buffer is full: {held / SAMPLE_RATE:.1f} s wait to be "
                f"transcribed and the limit is {self.max_buffer / SAMPLE_RATE:g} s "
                "(--realtime-max-buffer-seconds); this chunk was dropped", "audio")
        notices = self.tr.append(samples)
        self.worker.poke()
        return notices

    async def _on_output(self, out: StreamOutput) -> None:
        if self.handler is not None:
            await self.handler.on_output(out)

    async def _on_worker_error(self, message: str) -> None:
        await self.send_error(PROCESSING_ERROR, message)
        if self.state.engine.dead:
            await self.close(CLOSE_ERROR, "the engine is not running")
