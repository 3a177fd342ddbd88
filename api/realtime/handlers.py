"""WS /v1/realtime: the two protocols' client events and server events over one transcriber (API workers).

`VllmHandler`: vLLM's realtime events. `session.update{model}` validates the model (decoding
starts then); `input_audio_buffer.append` streams 16 kHz PCM16; `transcription.delta` events
carry the stable text as it appears (voice activity and commits cut utterances inside the task);
`input_audio_buffer.commit{final: true}` ends the audio and brings `transcription.done` with the
whole text: each utterance's final text, decoded as the file path does. vLLM's protocol has no
event that takes a delta back, so where a final text does not continue the deltas sent (a word
heard differently on less audio), `done.text` ("the complete transcription") is what counts and
the deltas were provisional. A later append or commit starts the next task.

`OpenAIHandler`: OpenAI's realtime transcription session (beta `transcription_session.update`
or GA `session.update` with a transcription session): 24 kHz PCM16 (resampled), server voice
activity (`speech_started` / `speech_stopped`) or manual commits, one conversation item per
utterance with `conversation.item.input_audio_transcription.delta` / `.completed`; the
completed event's transcript is the utterance's final text (file-path decoding), which supersedes
its deltas, as in OpenAI's API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from fornax.api.realtime.protocol import (
    COMMIT_EMPTY,
    INVALID_EVENT,
    OPENAI,
    PROCESSING_ERROR,
    SERVER_SHUTTING_DOWN,
    UNKNOWN_EVENT,
    VLLM,
    Cleared,
    ClientEventError,
    Committed,
    DurationUsage,
    ErrorEvent,
    ItemCreated,
    OpenAIError,
    OpenAIErrorInfo,
    OpenAISessionConfig,
    OpenAISessionEvent,
    SpeechStarted,
    SpeechStopped,
    TranscriptionDelta,
    TranscriptionDone,
    TranscriptionItemCompleted,
    TranscriptionItemDelta,
    UsageInfo,
    decode_pcm16,
    field,
    update_openai_config,
    user_item,
)
from fornax.audio.features import SAMPLE_RATE
from fornax.audio.languages import language_code
from fornax.audio.streaming import StreamOutput
from fornax.audio.vad import VadConfig

if TYPE_CHECKING:
    from fornax.api.realtime.routes import RealtimeConnection


class VllmHandler:
    """vLLM's realtime protocol."""

    protocol = VLLM

    def __init__(self, conn: RealtimeConnection) -> None:
        self.conn = conn
        self.validated = False
        self.finals: list[str] = []  # the final texts of the current task's items
        self.waiting: set[int] | None = None  # after a final commit: items still to finish

    async def start(self) -> None:
        pass

    def error_event(self, code: str, message: str, param: str | None,
                    client_event_id: str | None) -> msgspec.Struct:
        return ErrorEvent(message, code)

    async def handle(self, event: dict[str, Any], kind: str) -> None:
        conn = self.conn
        if kind == "session.update":
            model = field(event, "model", str)
            await conn.check_model(model)
            self.validated = conn.worker.enabled = True
            conn.worker.poke()
        elif kind == "input_audio_buffer.append":
            conn.append(decode_pcm16(event))
        elif kind == "input_audio_buffer.commit":
            final = field(event, "final", bool, False)
            if not self.validated:
                raise ClientEventError("model_not_validated", "the model is not validated: send "
                                       "session.update with the model first")
            if final:
                conn.tr.close()
                conn.worker.segment_closed()
                waiting = {s.item for s in conn.tr.segments}
                self.waiting = (self.waiting or set()) | waiting
                if not self.waiting:
                    await self._done()
        else:
            raise ClientEventError(UNKNOWN_EVENT, f"unknown event type {kind!r}; this protocol "
                                   "takes session.update, input_audio_buffer.append and "
                                   "input_audio_buffer.commit", "type")

    async def on_output(self, out: StreamOutput) -> None:
        if out.delta:
            await self.conn.send(TranscriptionDelta(out.delta))
        if out.final:
            if out.text:
                self.finals.append(out.text)
            if self.waiting is not None:
                self.waiting.discard(out.segment.item)
                if not self.waiting:
                    await self._done()

    async def _done(self) -> None:
        worker = self.conn.worker
        usage = UsageInfo(worker.prompt_tokens, worker.prompt_tokens + worker.completion_tokens,
                          worker.completion_tokens)
        worker.prompt_tokens = worker.completion_tokens = 0
        text, self.finals, self.waiting = " ".join(self.finals), [], None
        self.conn.tr.new_scope()
        await self.conn.send(TranscriptionDone(text, usage))


class OpenAIHandler:
    """OpenAI's realtime transcription session."""

    protocol = OPENAI

    def __init__(self, conn: RealtimeConnection, ga: bool = False) -> None:
        self.conn = conn
        self.ga = ga
        self.config = OpenAISessionConfig()
        self._resampler: Any = None
        self._item_ids: dict[int, str] = {}
        self._transcripts: dict[int, str] = {}
        self._samples: dict[int, int] = {}
        self._ended: set[int] = set()
        self._last_item_id: str | None = None
        conn.worker.enabled = True
        self._apply()

    async def start(self) -> None:
        """Announce the session (a connection that asked for ?intent=transcription)."""
        kind = "session.created" if self.ga else "transcription_session.created"
        await self.conn.send(OpenAISessionEvent(kind, self._describe()))

    def _describe(self) -> dict[str, Any]:
        session = self.config.describe(self.conn.state.model_name, self.ga)
        session["id"] = self.conn.session_id
        return session

    def error_event(self, code: str, message: str, param: str | None,
                    client_event_id: str | None) -> msgspec.Struct:
        kind = "server_error" if code in (PROCESSING_ERROR, SERVER_SHUTTING_DOWN) \
            else "invalid_request_error"
        return OpenAIError(OpenAIErrorInfo(kind, code, message, param, client_event_id))

    def _apply(self) -> None:
        cfg = self.config
        vad = VadConfig(threshold=cfg.threshold, prefix_padding_ms=cfg.prefix_padding_ms,
                        silence_duration_ms=cfg.silence_duration_ms) if cfg.vad else None
        self.conn.tr.configure(language=cfg.language, prompt=cfg.prompt, vad=vad)
        self._resampler = None

    async def handle(self, event: dict[str, Any], kind: str) -> None:
        conn = self.conn
        if kind in ("transcription_session.update", "session.update"):
            config = OpenAISessionConfig(**{f: getattr(self.config, f)
                                            for f in self.config.__struct_fields__})
            ga = update_openai_config(config, event)
            if config.model is not None:
                await conn.check_model(config.model)
            config.language = self._language(config.language)
            self.config, self.ga = config, ga or self.ga
            self._apply()
            kind = "session.updated" if self.ga else "transcription_session.updated"
            await conn.send(OpenAISessionEvent(kind, self._describe()))
        elif kind == "input_audio_buffer.append":
            for notice in conn.append(self._resample(decode_pcm16(event))):
                item_id = self._item_id(notice.item)
                ms = int(notice.sample * 1000 / SAMPLE_RATE)
                if notice.kind == "start":
                    await conn.send(SpeechStarted(ms, item_id))
                else:  # the stop, the commit and the item go out together
                    await self._end_item(notice.item, SpeechStopped(ms, item_id))
        elif kind == "input_audio_buffer.commit":
            if self._resampler is not None:  # the resampler's last few samples
                tail = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
                self._resampler = None
                if len(tail):
                    conn.append(tail)
            item = conn.tr.close()
            if item is None:
                raise ClientEventError(COMMIT_EMPTY, "the input audio buffer is empty: there is "
                                       "nothing to commit")
            conn.worker.segment_closed()
            await self._end_item(item)
        elif kind == "input_audio_buffer.clear":
            dropped = {s.item for s in conn.tr.clear()}
            conn.worker.segments_dropped()
            for item in dropped - self._ended:  # not yet committed: forgotten
                for table in (self._item_ids, self._transcripts, self._samples):
                    table.pop(item, None)
            await conn.send(Cleared())
        else:
            raise ClientEventError(UNKNOWN_EVENT, f"unknown event type {kind!r}; a transcription "
                                   "session takes transcription_session.update (or "
                                   "session.update), input_audio_buffer.append, "
                                   "input_audio_buffer.commit and input_audio_buffer.clear",
                                   "type")

    def _language(self, language: str | None) -> str | None:
        if not language or language.lower() in ("auto", "detect"):
            return None
        code = language_code(language)
        info = self.conn.info
        if code is None or (info.multilingual and code not in info.language_ids) \
                or (not info.multilingual and code != "en"):
            raise ClientEventError(INVALID_EVENT, f"language {language!r} is not supported by "
                                   "this model" + ("" if info.multilingual else
                                                   " (English only)"), "language")
        return code

    def _resample(self, samples: np.ndarray) -> np.ndarray:
        rate = self.config.rate
        if rate == SAMPLE_RATE:
            return samples
        if self._resampler is None:
            import soxr

            self._resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32",
                                                  quality="HQ")
        return self._resampler.resample_chunk(samples)

    def _item_id(self, item: int) -> str:
        item_id = self._item_ids.get(item)
        if item_id is None:
            item_id = self._item_ids[item] = f"item_{self.conn.session_id[-8:]}{item:04d}"
        return item_id

    async def _end_item(self, item: int, *before: msgspec.Struct) -> None:
        """Commit the item: `before` (a speech stop), committed and item.created as one group,
        so a partial transcription delta of the item cannot fall between them."""
        item_id = self._item_id(item)
        previous, self._last_item_id = self._last_item_id, item_id
        await self.conn.send(*before, Committed(item_id, previous),
                             ItemCreated(user_item(item_id), previous))
        self._ended.add(item)
        await self._maybe_complete(item)

    async def _maybe_complete(self, item: int) -> None:
        if item not in self._ended or any(s.item == item for s in self.conn.tr.segments):
            return
        self._ended.discard(item)
        item_id = self._item_id(item)
        del self._item_ids[item]
        seconds = round(self._samples.pop(item, 0) / SAMPLE_RATE, 3)
        await self.conn.send(TranscriptionItemCompleted(
            item_id, self._transcripts.pop(item, ""), usage=DurationUsage(seconds)))

    async def on_output(self, out: StreamOutput) -> None:
        item = out.segment.item
        if out.delta:
            self._transcripts[item] = self._transcripts.get(item, "") + out.delta
            await self.conn.send(TranscriptionItemDelta(self._item_id(item), out.delta))
        if out.final:  # the final text supersedes the deltas
            self._transcripts[item] = out.text or ""
            self._samples[item] = out.num_samples
            await self._maybe_complete(item)
