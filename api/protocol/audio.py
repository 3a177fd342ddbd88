"""Response shapes of /v1/audio/transcriptions and /v1/audio/translations, as OpenAI's (API workers)."""

from __future__ import annotations

import msgspec


class TranscriptionUsage(msgspec.Struct, omit_defaults=False):
    """Billing-style usage of a transcription: the audio's duration in whole seconds."""

    seconds: int
    type: str = "duration"


class TranscriptionWord(msgspec.Struct):
    word: str
    start: float
    end: float


class TranscriptionSegment(msgspec.Struct):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class TranscriptionResponse(msgspec.Struct, omit_defaults=True):
    """response_format=json"""

    text: str
    usage: TranscriptionUsage | None = None


class TranscriptionVerboseResponse(msgspec.Struct, omit_defaults=True):
    """response_format=verbose_json: segments always, words with timestamp_granularities[]=word."""

    task: str
    language: str
    duration: float
    text: str
    segments: list[TranscriptionSegment] | None = None
    words: list[TranscriptionWord] | None = None
    usage: TranscriptionUsage | None = None


class TranscriptTextDelta(msgspec.Struct, tag_field="type", tag="transcript.text.delta"):
    """One SSE event of a streamed transcription: the next piece of text."""

    delta: str


class TranscriptTextDone(msgspec.Struct, tag_field="type", tag="transcript.text.done",
                         omit_defaults=True):
    """The last SSE event of a streamed transcription: the whole text."""

    text: str
    usage: TranscriptionUsage | None = None
