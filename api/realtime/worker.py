"""The engine side of one realtime session: one decode in flight at a time, aborted when moot (API workers).

Each decode is an ordinary engine request (a short log-mel window), so the decodes of all
sessions share the engine's batches. A session never queues a second decode behind the first:
when the engine is slow, partial decodes simply come less often (each covers all audio so far).
When an utterance ends while a partial decode of it runs, that decode is aborted and the final
one starts at once: the file path's windows over the utterance's whole audio, one engine request
after another (a temperature fallback or a second window is another request). Finals go first
across sessions: partial decodes wait at the API worker's gate (api/realtime/gate.py) while any
final runs, and at most a few run at once; one that waited takes all the audio that came
meanwhile. A speculative final (at a pause, see audio/streaming.py) runs as a final; its result
is kept for the item's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fornax.api.realtime.gate import GATE, DecodeGate
from fornax.api.server.errors import APIError
from fornax.api.server.state import AppState
from fornax.audio.engine_io import WindowCollector, engine_request
from fornax.audio.streaming import DecodeJob, StreamingTranscriber, StreamOutput
from fornax.audio.transcribe import TranscriptionSession, WindowRequest

logger = logging.getLogger(__name__)

ERROR_BACKOFF_S = 1.0
# the engine admits lower values first: an ended utterance's decode goes before partial ones
FINAL_PRIORITY, PARTIAL_PRIORITY = 0, 1


class DecodeWorker:
    """Runs a transcriber's decode jobs on the engine; reports outputs and failures."""

    def __init__(self, state: AppState, transcriber: StreamingTranscriber, session_id: str,
                 on_output: Callable[[StreamOutput], Awaitable[None]],
                 on_error: Callable[[str], Awaitable[None]], gate: DecodeGate = GATE) -> None:
        self.state, self.tr, self.session_id = state, transcriber, session_id
        self.gate = gate
        self.on_output, self.on_error = on_output, on_error
        self.enabled = False  # vLLM's protocol: no decode before the model is validated
        self.prompt_tokens = 0  # engine work of the session's decodes (usage)
        self.completion_tokens = 0
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._job: DecodeJob | None = None
        self._task: asyncio.Task[Any] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closed_at = 0.0  # when a segment last closed, and the decode then in flight
        self._closed_with = ""

    @property
    def busy(self) -> bool:
        return self._job is not None

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run())

    def poke(self) -> None:
        """New audio or a closed segment: look for a job to run (a partial decode in flight
        gives way when the item pauses: its speculative final goes first, since the final text
        will replace the partial's anyway; a speculative final gives way when voice comes back,
        as its result could no longer stand)."""
        job = self._job
        if job is not None and (not job.final and self.tr.pausing() or self.tr.stale(job)):
            self._interrupt()
        self._wake.set()

    def segment_closed(self) -> None:
        """A segment ended: a partial decode of it that does not cover it all is moot."""
        job = self._job
        self._closed_at = time.perf_counter()
        self._closed_with = "idle" if job is None else "final" if job.final else "partial"
        if job is not None and not job.final and job.segment.closed \
                and not self.tr.covers(job):
            self._interrupt()
            self._closed_with += " (aborted)"
        self.poke()

    def segments_dropped(self) -> None:
        """Segments were cleared: a decode of one of them is moot."""
        job = self._job
        if job is not None and job.segment not in self.tr.segments:
            self._interrupt()
        self.poke()

    def _interrupt(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def close(self) -> bool:
        """The session ended: abort the decode in flight (its engine request) and stop.
        Returns whether a decode was in flight."""
        in_flight = self._task is not None and not self._task.done()
        for task in (self._task, self._runner):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._task, self._runner):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):  # closing anyway
                    await task
        return in_flight

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._run_jobs()
            except Exception as exc:  # a bug must not silence the session: say so, go on
                logger.exception("realtime session %s: the decode loop failed", self.session_id)
                await self.on_error(f"the server failed to transcribe: {type(exc).__name__}: "
                                    f"{exc}")
                await asyncio.sleep(ERROR_BACKOFF_S)
                self.poke()

    async def _run_jobs(self) -> None:
        """Run jobs while there are any."""
        while self.enabled and (job := self.tr.next_job()) is not None:
            self._job = job
            self._task = asyncio.create_task(self._final(job) if job.item_final
                                             else self._decode(job))
            try:
                await asyncio.wait({self._task})
            finally:
                task, self._task, self._job = self._task, None, None
            if task.cancelled():
                continue  # moot (see segment_closed); the loop picks the next job
            exc = task.exception()
            if exc is not None:
                await self._failed(job, exc)
                continue
            if job.speculative:
                self.tr.speculation_done(job, task.result())
                continue
            if job.item_final:
                out = self.tr.finish_item(job, task.result())
                if out is not None:
                    await self.on_output(out)
                continue
            collector = task.result()
            if not job.final and collector.finish_reason != "length" \
                    and self.tr.covers(job):
                job.final = True  # the segment closed, only silence came since: final
            out = self.tr.feed(job, collector.token_ids, collector.logprobs,
                               collector.no_speech_prob)
            if out is not None:
                await self.on_output(out)

    async def _failed(self, job: DecodeJob, exc: BaseException) -> None:
        message = exc.message if isinstance(exc, APIError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, APIError):
            logger.error("realtime decode failed in session %s", self.session_id,
                         exc_info=(type(exc), exc, exc.__traceback__))
        if job.speculative:  # the item's final decode runs again when it ends
            logger.warning("realtime speculative final decode failed in session %s: %s",
                           self.session_id, message)
        elif job.final:
            # end the segment with the text already sent, so its item / task still completes
            await self.on_error(f"transcribing the end of a segment failed: {message}")
            out = self.tr.finish_item(job, None) if job.item_final else self.tr.feed(job, [])
            if out is not None:
                await self.on_output(out)
        else:
            logger.warning("realtime partial decode failed in session %s: %s",
                           self.session_id, message)
        if self.state.engine.dead:
            await self.on_error(f"the engine is not running: {message}")
        await asyncio.sleep(ERROR_BACKOFF_S)

    async def _decode(self, job: DecodeJob) -> WindowCollector:
        async with self.gate.partial():
            self.tr.refresh(job)  # the audio that came while it waited
            window = await asyncio.to_thread(self.tr.window, job)
            return await self._request(window, job.final)

    async def _final(self, job: DecodeJob) -> TranscriptionSession:
        """An item's final text, decoded as /v1/audio/transcriptions decodes a file."""
        if job.ready is not None:  # decoded at the pause before the item ended
            logger.debug("realtime %s final of %.1f s: the speculative decode stands",
                         self.session_id, len(job.audio) / 16000)
            return job.ready
        async with self.gate.final():
            return await self._final_windows(job)

    async def _final_windows(self, job: DecodeJob) -> TranscriptionSession:
        start = time.perf_counter()
        session = await asyncio.to_thread(self.tr.final_session, job)
        stamps = [f"closed {1000 * (start - self._closed_at):.0f} ago with {self._closed_with}",
                  f"mel {1000 * (time.perf_counter() - start):.0f}"]
        while (window := session.next_request()) is not None:
            collector = await self._request(window, True, stamps)
            await asyncio.to_thread(session.feed, collector.result())
        logger.debug("realtime %s final of %.1f s: %s; total %.0f ms", self.session_id,
                     len(job.audio) / 16000, ", ".join(stamps),
                     1000 * (time.perf_counter() - start))
        return session

    async def _request(self, window: WindowRequest, final: bool,
                       stamps: list[str] | None = None) -> WindowCollector:
        """One engine request; `stamps` collects its timings (ms: sent, first token, done)."""
        rid = f"rt-{self.session_id}-{next(self._ids)}"
        start = time.perf_counter()
        engine = self.state.engine
        try:
            request = engine_request(rid, window)
            request.priority = FINAL_PRIORITY if final else PARTIAL_PRIORITY
            group = await engine.add([request])
        except asyncio.CancelledError:
            await engine.abort([rid])  # cancelled while sending: the engine may have it
            raise
        collector = WindowCollector()
        first = 0.0
        try:
            while not collector.finished:
                for out in await group.next():
                    collector.add(out)
                first = first or time.perf_counter()
        finally:
            await engine.release(group)  # aborts the request in the engine if unfinished
        if stamps is not None:
            stamps.append(f"window ({len(window.prompt_token_ids)} prompt, "
                          f"{len(collector.token_ids)} out) first token "
                          f"{1000 * (first - start):.0f} done "
                          f"{1000 * (time.perf_counter() - start):.0f}")
        self.prompt_tokens += len(window.prompt_token_ids)
        self.completion_tokens += len(collector.token_ids)
        metrics = self.state.metrics
        metrics.prompt_tokens.inc(len(window.prompt_token_ids))
        metrics.generation_tokens.inc(len(collector.token_ids))
        return collector
