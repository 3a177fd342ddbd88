"""WS /v1/realtime event shapes: vLLM's realtime protocol and OpenAI's transcription session (API workers).

Client events are decoded loosely (a JSON object with a `type`; unknown fields are ignored) and
checked field by field, so every bad event gets an error event that names the problem. Server
events are msgspec structs encoded to JSON text frames.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Any

import msgspec
import numpy as np

# error codes (vLLM's realtime contract); OpenAI-protocol errors carry the same codes
INVALID_JSON = "invalid_json"
INVALID_EVENT = "invalid_event"
MODEL_NOT_FOUND = "model_not_found"
MODEL_NOT_VALIDATED = "model_not_validated"
INVALID_AUDIO = "invalid_audio"
UNKNOWN_EVENT = "unknown_event"
PROCESSING_ERROR = "processing_error"
# beyond the contract: OpenAI's empty commit, session limits
COMMIT_EMPTY = "input_audio_buffer_commit_empty"
SESSION_EXPIRED = "session_expired"
IDLE_TIMEOUT = "idle_timeout"
SESSION_LIMIT = "session_limit_reached"  # --realtime-max-sessions: the error before 1013
SERVER_SHUTTING_DOWN = "server_shutting_down"  # the server stops: the error before 1001

MAX_EVENT_BYTES = 8 * 1024 * 1024  # one client event (base64 audio included)

VLLM = "vllm"
OPENAI = "openai"
# first client events that choose the protocol
OPENAI_FIRST_EVENTS = frozenset({"transcription_session.update"})


def _event_id() -> str:
    return f"event_{uuid.uuid4().hex[:20]}"


class ClientEventError(Exception):
    """A bad client event: answered with an error event of `code`; the session goes on."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


_json_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def parse_event(text: str | bytes) -> tuple[dict[str, Any], str]:
    """A client frame -> (event object, its type); ClientEventError when it is not one."""
    if len(text) > MAX_EVENT_BYTES:
        raise ClientEventError(INVALID_EVENT, f"the event is {len(text)} bytes; at most "
                               f"{MAX_EVENT_BYTES} are accepted (send audio in smaller chunks)")
    try:
        event = _json_decoder.decode(text)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ClientEventError(INVALID_JSON, f"the event is not valid JSON: {exc}") from None
    if not isinstance(event, dict):
        raise ClientEventError(INVALID_EVENT, "an event must be a JSON object with a \"type\"")
    kind = event.get("type")
    if not isinstance(kind, str) or not kind:
        raise ClientEventError(INVALID_EVENT, "the event has no \"type\" string", "type")
    return event, kind


def field(event: dict[str, Any], name: str, kind: type | tuple[type, ...],
          default: Any = None, where: str = "") -> Any:
    """event[name] if present and of `kind` (None counts as absent), else a ClientEventError."""
    value = event.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        label = f"{where}.{name}" if where else name
        raise ClientEventError(INVALID_EVENT, f"{label} must be {_article(names)}, got "
                               f"{type(value).__name__}", label)
    return value


def _article(name: str) -> str:
    words = {"str": "a string", "bool": "a boolean", "dict": "an object", "int": "an integer",
             "float": "a number", "list": "a list"}
    return " or ".join(words.get(n, n) for n in name.split(" or "))


def decode_pcm16(event: dict[str, Any]) -> np.ndarray:
    """The `audio` field: base64 of little-endian 16-bit mono PCM -> float32 samples in [-1, 1]."""
    audio = event.get("audio")
    if not isinstance(audio, str):
        raise ClientEventError(INVALID_EVENT, "input_audio_buffer.append needs \"audio\": base64 "
                               "of 16-bit little-endian mono PCM", "audio")
    try:
        raw = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise ClientEventError(INVALID_AUDIO, "audio is not valid base64", "audio") from None
    if not raw:
        raise ClientEventError(INVALID_AUDIO, "audio is empty", "audio")
    if len(raw) % 2:
        raise ClientEventError(INVALID_AUDIO, f"audio has {len(raw)} bytes: 16-bit PCM needs an "
                               "even number", "audio")
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def encode(event: msgspec.Struct) -> str:
    return _encoder.encode(event).decode()


# ---- vLLM's protocol -------------------------------------------------------------------------
class SessionCreated(msgspec.Struct, tag_field="type", tag="session.created"):
    id: str
    created: int


class TranscriptionDelta(msgspec.Struct, tag_field="type", tag="transcription.delta"):
    delta: str


class UsageInfo(msgspec.Struct):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int = 0


class TranscriptionDone(msgspec.Struct, tag_field="type", tag="transcription.done"):
    text: str
    usage: UsageInfo | None = None


class ErrorEvent(msgspec.Struct, tag_field="type", tag="error"):
    error: str
    code: str | None = None


def session_created() -> SessionCreated:
    return SessionCreated(f"sess-{uuid.uuid4().hex}", int(time.time()))


# ---- OpenAI's realtime transcription session -------------------------------------------------
class OpenAIErrorInfo(msgspec.Struct):
    type: str
    code: str | None
    message: str
    param: str | None = None
    event_id: str | None = None  # the client event that failed


class OpenAIError(msgspec.Struct, tag_field="type", tag="error"):
    error: OpenAIErrorInfo
    event_id: str = msgspec.field(default_factory=_event_id)


class OpenAISessionEvent(msgspec.Struct):
    """transcription_session.created / .updated (and GA session.created / .updated)."""

    type: str
    session: dict[str, Any]
    event_id: str = msgspec.field(default_factory=_event_id)


class SpeechStarted(msgspec.Struct, tag_field="type", tag="input_audio_buffer.speech_started"):
    audio_start_ms: int
    item_id: str
    event_id: str = msgspec.field(default_factory=_event_id)


class SpeechStopped(msgspec.Struct, tag_field="type", tag="input_audio_buffer.speech_stopped"):
    audio_end_ms: int
    item_id: str
    event_id: str = msgspec.field(default_factory=_event_id)


class Committed(msgspec.Struct, tag_field="type", tag="input_audio_buffer.committed"):
    item_id: str
    previous_item_id: str | None = None
    event_id: str = msgspec.field(default_factory=_event_id)


class Cleared(msgspec.Struct, tag_field="type", tag="input_audio_buffer.cleared"):
    event_id: str = msgspec.field(default_factory=_event_id)


class ItemCreated(msgspec.Struct, tag_field="type", tag="conversation.item.created"):
    item: dict[str, Any]
    previous_item_id: str | None = None
    event_id: str = msgspec.field(default_factory=_event_id)


class TranscriptionItemDelta(msgspec.Struct, tag_field="type",
                             tag="conversation.item.input_audio_transcription.delta"):
    item_id: str
    delta: str
    content_index: int = 0
    event_id: str = msgspec.field(default_factory=_event_id)


class DurationUsage(msgspec.Struct):
    seconds: float
    type: str = "duration"


class TranscriptionItemCompleted(msgspec.Struct, tag_field="type",
                                 tag="conversation.item.input_audio_transcription.completed"):
    item_id: str
    transcript: str
    content_index: int = 0
    usage: DurationUsage | None = None
    event_id: str = msgspec.field(default_factory=_event_id)


def user_item(item_id: str) -> dict[str, Any]:
    return {"id": item_id, "object": "realtime.item", "type": "message", "status": "completed",
            "role": "user", "content": [{"type": "input_audio", "transcript": None}]}


class OpenAISessionConfig(msgspec.Struct):
    """What a transcription session can set (beta and GA shapes both map onto this)."""

    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    rate: int = 24000
    vad: bool = True
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500

    def describe(self, served_model: str, ga: bool) -> dict[str, Any]:
        """The session object sent back in *.created / *.updated."""
        turn = ({"type": "server_vad", "threshold": self.threshold,
                 "prefix_padding_ms": self.prefix_padding_ms,
                 "silence_duration_ms": self.silence_duration_ms} if self.vad else None)
        transcription = {"model": self.model or served_model, "language": self.language,
                         "prompt": self.prompt or ""}
        if ga:
            return {"type": "transcription", "object": "realtime.transcription_session",
                    "audio": {"input": {"format": {"type": "audio/pcm", "rate": self.rate},
                                        "transcription": transcription,
                                        "turn_detection": turn}}}
        return {"object": "realtime.transcription_session", "input_audio_format": "pcm16",
                "input_audio_transcription": transcription, "turn_detection": turn}


def update_openai_config(config: OpenAISessionConfig, event: dict[str, Any]) -> bool:
    """Apply a transcription_session.update (beta) or session.update (GA) event; returns whether
    it used the GA shape. Raises ClientEventError naming the bad field."""
    session = field(event, "session", dict, {}, event["type"])
    ga = "audio" in session or session.get("type") == "transcription"
    where = "session"
    if ga:
        audio = field(session, "audio", dict, {}, where)
        session = field(audio, "input", dict, {}, "session.audio")
        where = "session.audio.input"
        fmt = field(session, "format", dict, None, where)
        if fmt is not None:
            kind = field(fmt, "type", str, "audio/pcm", where + ".format")
            if kind != "audio/pcm":
                raise ClientEventError(INVALID_EVENT, f"{where}.format.type {kind!r} is not "
                                       "supported; send audio/pcm (16-bit mono)",
                                       where + ".format.type")
            rate = field(fmt, "rate", int, 24000, where + ".format")
            if rate not in (16000, 24000):
                raise ClientEventError(INVALID_EVENT, f"{where}.format.rate must be 24000 or "
                                       f"16000, got {rate}", where + ".format.rate")
            config.rate = rate
        trans_key, turn_key = "transcription", "turn_detection"
    else:
        fmt = field(session, "input_audio_format", str, None, where)
        if fmt is not None and fmt != "pcm16":
            raise ClientEventError(INVALID_EVENT, f"input_audio_format {fmt!r} is not supported; "
                                   "send pcm16 (24 kHz mono)", "session.input_audio_format")
        trans_key, turn_key = "input_audio_transcription", "turn_detection"
    trans = field(session, trans_key, dict, None, where)
    if trans is not None:
        config.model = field(trans, "model", str, config.model, f"{where}.{trans_key}")
        config.language = field(trans, "language", str, config.language, f"{where}.{trans_key}")
        config.prompt = field(trans, "prompt", str, config.prompt, f"{where}.{trans_key}")
    if turn_key in session:
        turn = session[turn_key]
        if turn is None:
            config.vad = False
        else:
            label = f"{where}.{turn_key}"
            turn = field(session, turn_key, dict, {}, where)
            kind = field(turn, "type", str, "server_vad", label)
            if kind not in ("server_vad", "semantic_vad"):
                raise ClientEventError(INVALID_EVENT, f"{label}.type must be server_vad (or "
                                       f"null for manual commits), got {kind!r}", label + ".type")
            config.vad = True
            threshold = field(turn, "threshold", (int, float), config.threshold, label)
            if not 0.0 <= threshold <= 1.0:
                raise ClientEventError(INVALID_EVENT, f"{label}.threshold must lie in [0, 1]",
                                       label + ".threshold")
            config.threshold = float(threshold)
            for name in ("prefix_padding_ms", "silence_duration_ms"):
                value = field(turn, name, int, getattr(config, name), label)
                if not 0 <= value <= 10000:
                    raise ClientEventError(INVALID_EVENT, f"{label}.{name} must lie in "
                                           "[0, 10000]", f"{label}.{name}")
                setattr(config, name, value)
    return ga
