"""Offline speech-to-text: `SpeechToText` runs transcription sessions on an in-process engine core.

Every file's current window is in the engine at the same time, so windows of different files
share encoder batches and decoder steps (continuous batching), as they do behind `fornax serve`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from fornax.audio.decode import decode_audio
from fornax.audio.engine_io import WindowCollector, engine_request
from fornax.audio.transcribe import (
    Segment,
    TranscribeOptions,
    TranscriptionSession,
    WhisperInfo,
)
from fornax.runtime.config import make_engine_config
from fornax.runtime.errors import ConfigError, RequestFailedError

logger = logging.getLogger(__name__)

AudioInput = str | Path | bytes | np.ndarray  # a file path, file bytes, or 16 kHz mono samples


@dataclass
class Transcription:
    text: str
    language: str  # the language name ("english")
    duration: float
    segments: list[Segment] = field(default_factory=list)


class SpeechToText:
    """Transcribe or translate audio files with a Whisper model, without a server.

    `SpeechToText("whisper-tiny.en")` loads the packaged tiny.en; any HF Whisper folder or
    CTranslate2 Whisper folder works too.
    """

    def __init__(self, model: str = "whisper-tiny.en", **engine_args: Any) -> None:
        from fornax.runtime.engine.factory import make_engine_core

        self.engine = make_engine_core(make_engine_config(model, **engine_args).resolve())
        if self.engine.runner_type != "transcription":
            raise ConfigError(f"{model} is not a speech-to-text model")
        path = self.engine.files.path
        self.info = WhisperInfo.from_folder(path)
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._ids = itertools.count()

    def transcribe(self, audio: AudioInput | Sequence[AudioInput], *, task: str = "transcribe",
                   language: str | None = None, prompt: str | None = None,
                   temperature: float = 0.0, timestamps: bool = True,
                   word_timestamps: bool = False) -> list[Transcription]:
        """One Transcription per input, in input order (a single input still gives a list)."""
        inputs = [audio] if isinstance(audio, (str, Path, bytes, np.ndarray)) else list(audio)
        if task == "translate" and not self.info.multilingual:
            raise ConfigError("this model is English-only: it cannot translate")
        opts = TranscribeOptions(task=task, language=language, prompt=prompt,
                                 temperature=temperature, timestamps=timestamps,
                                 word_timestamps=word_timestamps)
        sessions = [TranscriptionSession(self._samples(a), self.info, self.tokenizer, opts)
                    for a in inputs]
        self.run(sessions)
        return [Transcription(s.text, s.language_name, s.duration, s.segments) for s in sessions]

    @staticmethod
    def _samples(audio: AudioInput) -> np.ndarray:
        if isinstance(audio, np.ndarray):
            return audio.astype(np.float32).reshape(-1)
        data = audio if isinstance(audio, bytes) else Path(audio).read_bytes()
        return decode_audio(data)

    def run(self, sessions: list[TranscriptionSession]) -> None:
        """Drive every session to its end; all their current windows run in the engine together."""
        engine = self.engine
        inflight: dict[str, tuple[TranscriptionSession, WindowCollector]] = {}
        waiting = list(sessions)
        while waiting or inflight:
            for session in waiting:
                window = session.next_request()
                if window is None:
                    continue
                rid = f"stt-{next(self._ids)}"
                engine.add_request(engine_request(rid, window))
                inflight[rid] = (session, WindowCollector())
            waiting = []
            for out in engine.step():
                entry = inflight.get(out.request_id)
                if entry is None:
                    continue
                session, collector = entry
                if out.error is not None:  # the engine failed this window: end the run cleanly
                    engine.abort_requests(list(inflight))
                    raise RequestFailedError(out.error)
                collector.add(out)
                if collector.finished:
                    del inflight[out.request_id]
                    session.feed(collector.result())
                    waiting.append(session)
