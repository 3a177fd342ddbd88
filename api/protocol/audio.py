"""Response shapes of /v1/audio/transcriptions and /v1/audio/translations, as OpenAI's (API workers)."""

from __future__ import annotations

import msgspec

# The segment and word shapes are those the transcription session produces (torch-free).
from fornax.audio.transcribe import TranscriptionSegment
from fornax.audio.words import Word as TranscriptionWord

__all__ = ["TranscriptionSegment", "TranscriptionWord"]


class TranscriptionUsage(msgspec.Struct, omit_defaults=False):
    """Billing-style usage of a transcription: the audio's duration in whole seconds."""

    seconds: int
    type: str = "duration"


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
