"""POST /v1/audio/transcriptions and /v1/audio/translations: multipart upload -> Whisper (API workers).

The upload is decoded and featurized in a worker thread (NumPy, soundfile, soxr: no torch), then a
`TranscriptionSession` sends one engine request per 30 s window; windows of concurrent uploads
share the engine's batches. Responses: json, text, srt, vtt, verbose_json (segments, and words
with `timestamp_granularities[]=word`), or SSE `transcript.text.delta` / `transcript.text.done`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fornax.api.generation.generate import new_request_id
from fornax.api.multipart import MultipartError, Part, parse_multipart
from fornax.api.protocol.audio import (
    TranscriptionResponse,
    TranscriptionSegment,
    TranscriptionUsage,
    TranscriptionVerboseResponse,
    TranscriptionWord,
    TranscriptTextDelta,
    TranscriptTextDone,
)
from fornax.api.protocol.fields import check_form_fields
from fornax.api.protocol.vllm_fields import HONOURED, TRANSCRIPTION
from fornax.api.server.errors import APIError
from fornax.api.server.http import (
    SSE_DONE,
    Request,
    Response,
    StreamingResponse,
    json_response,
    sse,
)
from fornax.api.server.state import AppState
from fornax.audio.decode import AudioDecodeError, decode_audio
from fornax.audio.engine_io import WindowCollector, engine_request
from fornax.audio.features import N_SAMPLES
from fornax.audio.formats import RESPONSE_FORMATS, render_text
from fornax.audio.languages import language_code
from fornax.audio.transcribe import TranscribeOptions, TranscriptionSession, WhisperInfo
from fornax.runtime.engine.messages import EngineCoreRequest

logger = logging.getLogger(__name__)

DEFAULT_MAX_AUDIO_MB = 25
MIB = 1024 * 1024
_FORM_SLACK_BYTES = 1 * MIB  # the other form fields and multipart framing around the file
MAX_FIELD_BYTES = 64 * 1024  # one form field other than `file` (a prompt, a language, ...)
_infos: dict[str, WhisperInfo] = {}


@dataclass
class AudioForm:
    file: Part
    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    temperature: float = 0.0
    response_format: str = "json"
    granularities: tuple[str, ...] = ()
    stream: bool = False


def is_transcription(state: AppState) -> bool:
    return getattr(state.engine_info, "runner", "generate") == "transcription"


def transcription_probe(state: AppState) -> EngineCoreRequest:
    """/health?deep=1 on a speech model: one token from one window of silence."""
    import numpy as np

    from fornax.audio.transcribe import WindowRequest

    info = whisper_info(state)
    ids = info.ids
    prompt = [ids["sot"]] + ([info.language_ids["en"], ids["transcribe"]]
                             if info.multilingual else []) + [ids["no_timestamps"]]
    silence = np.full((info.num_mel_bins, 3000), -1.5, dtype=np.float32)  # log-mel of zeros
    window = WindowRequest(prompt, silence, 3000, False, [], 0.0, 0, 1, False)
    return engine_request(f"health-{uuid.uuid4().hex}", window)


def max_audio_bytes(state: AppState) -> int:
    mb = getattr(state.settings, "max_audio_filesize_mb", None) or DEFAULT_MAX_AUDIO_MB
    return int(mb * MIB)


def whisper_info(state: AppState) -> WhisperInfo:
    """The served model's Whisper facts; 501 when this server does not run a speech model."""
    info = state.engine_info
    if not is_transcription(state):
        raise APIError(501, f"the served model ({info.architecture or 'unknown'}) does not "
                       "support transcriptions; serve a Whisper model (e.g. fornax serve "
                       "whisper-tiny.en)", "model")
    cached = _infos.get(info.model_path)
    if cached is None:
        cached = _infos[info.model_path] = WhisperInfo.from_folder(info.model_path)
    return cached


# the form fields parse_form reads (vLLM's others: a 400 or ignored, see api/protocol/fields.py)
_FORM_FIELDS = frozenset(k for k, v in TRANSCRIPTION.items() if v.status == HONOURED)


def _field(parts: dict[str, list[Part]], name: str) -> str | None:
    values = parts.get(name)
    return values[-1].text().strip() if values else None


def _bool(value: str | None, name: str) -> bool:
    if value is None or value == "":
        return False
    lowered = value.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise APIError(400, f"{name} must be true or false, got {value!r}", name)


def parse_form(parts: list[Part]) -> AudioForm:
    by_name: dict[str, list[Part]] = {}
    for part in parts:
        if part.name != "file" and len(part.data) > MAX_FIELD_BYTES:
            raise APIError(400, f"form field {part.name[:64]!r} is {len(part.data)} bytes; at "
                           f"most {MAX_FIELD_BYTES} are accepted (only 'file' holds audio)",
                           part.name[:64])
        by_name.setdefault(part.name, []).append(part)
    check_form_fields("TranscriptionForm", _FORM_FIELDS, list(by_name),
                      lambda k: by_name[k][-1].text())
    files = by_name.get("file")
    if not files:
        raise APIError(400, "the form has no 'file' field holding the audio", "file")
    form = AudioForm(file=files[-1], model=_field(by_name, "model") or None,
                     language=_field(by_name, "language") or None,
                     prompt=_field(by_name, "prompt") or None)
    temperature = _field(by_name, "temperature")
    if temperature:
        try:
            form.temperature = float(temperature)
        except ValueError:
            raise APIError(400, f"temperature must be a number, got {temperature!r}",
                           "temperature") from None
        if not 0.0 <= form.temperature <= 1.0:
            raise APIError(400, f"temperature must be between 0 and 1, got {temperature}",
                           "temperature")
    fmt = (_field(by_name, "response_format") or "json").lower()
    if fmt not in RESPONSE_FORMATS:
        raise APIError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got "
                       f"{fmt!r}", "response_format")
    form.response_format = fmt
    grans = [p.text().strip().lower() for key in ("timestamp_granularities[]",
                                                  "timestamp_granularities")
             for p in by_name.get(key, [])]
    for g in grans:
        if g not in ("word", "segment"):
            raise APIError(400, f"timestamp_granularities entries must be 'word' or 'segment', "
                           f"got {g!r}", "timestamp_granularities")
    if grans and fmt != "verbose_json":
        raise APIError(400, "timestamp_granularities needs response_format=verbose_json",
                       "timestamp_granularities")
    form.granularities = tuple(dict.fromkeys(grans))
    form.stream = _bool(_field(by_name, "stream"), "stream")
    if form.stream and fmt not in ("json", "text"):
        raise APIError(400, f"stream=true works with response_format json or text, not {fmt}",
                       "stream")
    return form


def _options(info: WhisperInfo, form: AudioForm, task: str, duration: float) -> TranscribeOptions:
    language = None
    if form.language and form.language.lower() not in ("auto", "detect"):
        language = language_code(form.language)
        if language is None:
            raise APIError(400, f"unknown language {form.language!r}; use an ISO-639-1 code such "
                           "as 'en' or 'de'", "language")
    if not info.multilingual:
        if task == "translate":
            raise APIError(400, "this model is English-only: it cannot translate; serve a "
                           "multilingual Whisper model (e.g. whisper-base)", "model")
        if language not in (None, "en"):
            raise APIError(400, f"this model is English-only; language {form.language!r} is not "
                           "supported", "language")
        language = "en"
    elif language is not None and language not in info.language_ids:
        raise APIError(400, f"this model has no language token for {language!r}", "language")
    needs_times = form.response_format in ("verbose_json", "srt", "vtt")
    return TranscribeOptions(
        task=task, language=language, prompt=form.prompt, temperature=form.temperature,
        timestamps=needs_times or duration * 16000 > N_SAMPLES,
        word_timestamps="word" in form.granularities, allow_fallback=not form.stream)


async def transcriptions(req: Request) -> Response:
    return await _handle(req, "transcribe")


async def translations(req: Request) -> Response:
    return await _handle(req, "translate")


async def _handle(req: Request, task: str) -> Response:
    state = req.state
    info = whisper_info(state)
    limit = max_audio_bytes(state)
    too_large = APIError(413, f"the audio file is larger than the limit of {limit // MIB} MB "
                         "(--max-audio-filesize-mb)", "file", headers={"connection": "close"})
    declared = req.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + _FORM_SLACK_BYTES:
        raise too_large
    body = await req.body(limit=max(limit + _FORM_SLACK_BYTES,
                                    state.settings.max_request_body_bytes))
    try:
        form = parse_form(parse_multipart(body, req.headers.get("content-type")))
    except MultipartError as exc:
        raise APIError(400, f"malformed upload: {exc}") from None
    if len(form.file.data) > limit:
        raise too_large
    state.resolve_model(form.model)  # 404 for a model this server does not serve
    try:
        audio = await asyncio.to_thread(decode_audio, form.file.data, form.file.filename,
                                        state.settings.max_audio_seconds)
    except AudioDecodeError as exc:
        raise APIError(400, str(exc), "file") from None
    duration = len(audio) / 16000
    opts = _options(info, form, task, duration)
    session = await asyncio.to_thread(TranscriptionSession, audio, info,
                                      state.tokenizer.tokenizer, opts)
    public_id, engine_id = new_request_id("trsc" if task == "transcribe" else "trsl",
                                          req.request_id)
    if state.settings.log_requests:
        logger.info("%s request %s: %.1f s of audio, language %s, format %s%s", task, public_id,
                    duration, opts.language or "auto", form.response_format,
                    ", stream" if form.stream else "")
    req.watch_disconnect()
    headers = {"x-request-id": public_id}
    if form.stream:
        return StreamingResponse(_stream(state, session, engine_id, form), headers=headers)
    async for _ in run_session(state, session, engine_id):
        pass
    return _response(session, form, task, headers)


async def run_session(state: AppState, session: TranscriptionSession, engine_id: str
                      ) -> AsyncIterator[tuple[WindowCollector, list[Any] | None]]:
    """Send the session's windows one by one; yields (collector, None) after every engine
    delivery and (collector, finalized segments) when a window is done."""
    n = 0
    arrival = time.monotonic()
    while (window := session.next_request()) is not None:
        rid = f"{engine_id}-{n}"
        n += 1
        group = await state.engine.add([engine_request(rid, window)])
        collector = WindowCollector()
        try:
            while not collector.finished:
                for out in await group.next():
                    collector.add(out)
                if not collector.finished:
                    yield collector, None
        finally:
            await state.engine.release(group)
        state.metrics.prompt_tokens.inc(len(window.prompt_token_ids))
        state.metrics.generation_tokens.inc(len(collector.token_ids))
        segments = await asyncio.to_thread(session.feed, collector.result())
        yield collector, segments
    state.metrics.request_finished("stop")
    state.metrics.e2e.observe(time.monotonic() - arrival)


def _usage(session: TranscriptionSession) -> TranscriptionUsage:
    return TranscriptionUsage(seconds=math.ceil(session.duration))


def _response(session: TranscriptionSession, form: AudioForm, task: str,
              headers: dict[str, str]) -> Response:
    fmt = form.response_format
    if fmt == "json":
        return json_response(TranscriptionResponse(session.text, _usage(session)),
                             headers=headers)
    if fmt == "verbose_json":
        segments = [TranscriptionSegment(s.id, s.seek, round(s.start, 2), round(s.end, 2),
                                         s.text, s.tokens, s.temperature, s.avg_logprob,
                                         s.compression_ratio, s.no_speech_prob)
                    for s in session.segments]
        words = None
        if "word" in form.granularities:
            words = [TranscriptionWord(w.word, w.start, w.end)
                     for s in session.segments for w in s.words]
        return json_response(TranscriptionVerboseResponse(
            task=task, language=session.language_name, duration=round(session.duration, 2),
            text=session.text, segments=segments if "segment" in form.granularities
            or not form.granularities else None, words=words, usage=_usage(session)),
            headers=headers)
    body, content_type = render_text(fmt, session.text, session.segments)
    return Response(body.encode("utf-8"), content_type=content_type, headers=headers)


async def _stream(state: AppState, session: TranscriptionSession, engine_id: str,
                  form: AudioForm) -> AsyncIterator[bytes]:
    """Token deltas inside a window decoded without timestamps (nothing is ever re-decoded);
    with timestamps, each segment once its closing timestamp pair arrives (the window's unclosed
    tail may be decoded again by the next window, so it waits)."""
    sent = ""
    finished = ""  # text of finalized segments
    try:
        async for collector, segments in run_session(state, session, engine_id):
            if segments is not None:
                finished += "".join(s.text for s in segments)
                current = finished
            else:
                current = finished + session.partial_text(collector.token_ids)
                if current.endswith("\ufffd"):
                    continue  # a character split across tokens: wait for the rest
            current = current.lstrip()
            if current.startswith(sent) and len(current) > len(sent):
                yield sse(TranscriptTextDelta(current[len(sent):]))
                sent = current
        yield sse(TranscriptTextDone(session.text, _usage(session)))
    except APIError as exc:
        yield sse(exc.to_response())
    yield SSE_DONE
