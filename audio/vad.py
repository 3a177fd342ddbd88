"""Energy-based voice activity detection over 16 kHz PCM, 20 ms frames; the detector factory (API workers, torch-free).

Each frame's RMS level (dBFS) is compared with an adaptive noise floor: a frame is voiced when it
is `margin_db` above the floor and above an absolute minimum. Speech starts after `start_ms` of
voiced frames (reported `prefix_padding_ms` earlier, so the onset is kept) and stops after
`silence_duration_ms` without a voiced frame. The floor is the quietest 100 ms of the last 3 s,
so steady background noise (a fan, a microphone's hiss) stops counting as speech within seconds.
It is the fallback of the default turn detector, Silero VAD (`make_vad`, `--realtime-vad`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

SAMPLE_RATE = 16000
FRAME_SAMPLES = 320  # 20 ms
FRAME_S = FRAME_SAMPLES / SAMPLE_RATE
FLOOR_BLOCK_FRAMES = 5  # the noise floor is the quietest 100 ms block ...
FLOOR_WINDOW_BLOCKS = 30  # ... of the last 3 s
FLOOR_HEADROOM_DB = 2.0  # a noise frame is a little louder than the quietest block


@dataclass(frozen=True)
class VadConfig:
    threshold: float = 0.5  # 0..1 (OpenAI's server_vad scale): higher needs louder speech
    prefix_padding_ms: int = 300  # audio kept before the detected onset
    silence_duration_ms: int = 500  # silence that ends an utterance
    start_ms: int = 60  # voiced audio needed to start one
    min_level_db: float = -55.0  # frames quieter than this are never speech

    @property
    def margin_db(self) -> float:
        """Level above the noise floor that counts as voice: 8 dB at threshold 0, 26 dB at 1."""
        return 8.0 + 18.0 * min(max(self.threshold, 0.0), 1.0)


def make_vad(config: VadConfig | None = None, kind: str = "silero") -> Any:
    """A streaming detector: Silero VAD (audio/silero_vad.py) where its model is installed,
    else (or for kind "energy") the energy detector; both take `feed(samples)`."""
    if kind == "silero":
        from fornax.audio.silero_vad import SileroVad, available

        if available():
            return SileroVad(config)
    return EnergyVad(config)


@dataclass(frozen=True)
class VadEvent:
    kind: str  # "start" or "stop"
    sample: int  # where speech starts (minus the padding) or where it stopped, in stream samples
    at: int  # where it was detected (the end of the deciding frame)


def frame_levels(samples: np.ndarray) -> np.ndarray:
    """RMS level in dBFS of each whole 20 ms frame of float32 samples in [-1, 1]."""
    n = len(samples) // FRAME_SAMPLES
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    frames = samples[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES).astype(np.float64)
    power = np.mean(frames * frames, axis=1)
    return (10.0 * np.log10(np.maximum(power, 1e-12))).astype(np.float32)


class TurnDetector:
    """The turn logic of every detector, over one decision per frame: speech starts after
    `start_ms` of voiced frames (reported `prefix_padding_ms` earlier) and stops after
    `silence_duration_ms` of silent ones. Subclasses feed `_step` and set `frame_samples`."""

    frame_samples = FRAME_SAMPLES

    def __init__(self, config: VadConfig | None = None) -> None:
        self.config = config or VadConfig()
        self._rest = np.zeros(0, dtype=np.float32)  # samples short of a whole frame
        self._frame = 0  # frames consumed
        self.speaking = False
        self._run = 0  # consecutive voiced frames (before a start), silent ones (after)
        self.last_voiced = 0  # stream position where the last voiced frame ended
        self.last_sound = 0  # ... the last frame not silent (voiced, or in a hysteresis band)

    def _frames(self, samples: np.ndarray) -> np.ndarray:
        """The whole frames of the audio so far ([n, frame_samples]); keeps the rest."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        data = np.concatenate([self._rest, samples]) if len(self._rest) else samples
        n = len(data) // self.frame_samples
        self._rest = data[n * self.frame_samples:].copy()
        return data[: n * self.frame_samples].reshape(n, self.frame_samples)

    def _step(self, voiced: bool, silent: bool) -> VadEvent | None:
        """One frame's decision (`silent` ends speech; a detector with hysteresis may call a
        frame neither voiced nor silent); returns the start or stop it makes, if any."""
        cfg, size = self.config, self.frame_samples
        frame_s = size / SAMPLE_RATE
        end_sample = (self._frame + 1) * size
        event = None
        if voiced:
            self.last_voiced = end_sample
        if not silent:
            self.last_sound = end_sample
        if not self.speaking:
            self._run = self._run + 1 if voiced else 0
            if self._run >= max(1, round(cfg.start_ms / 1000 / frame_s)):
                self.speaking = True
                onset = self._frame + 1 - self._run - round(cfg.prefix_padding_ms / 1000
                                                            / frame_s)
                event = VadEvent("start", max(0, onset) * size, end_sample)
                self._run = 0
        else:
            self._run = self._run + 1 if silent else 0
            if self._run >= max(1, round(cfg.silence_duration_ms / 1000 / frame_s)):
                self.speaking = False
                event = VadEvent("stop", (self._frame + 1 - self._run) * size, end_sample)
                self._run = 0
        self._frame += 1
        return event

    @property
    def silent_ms(self) -> float:
        """How long the speech has paused so far (0 when not speaking)."""
        return self._run * self.frame_samples / SAMPLE_RATE * 1000 if self.speaking else 0.0

    @property
    def position(self) -> int:
        """Samples consumed in whole frames."""
        return self._frame * self.frame_samples


class EnergyVad(TurnDetector):
    """Streaming detector: feed audio of any length, get start/stop events in stream samples."""

    def __init__(self, config: VadConfig | None = None) -> None:
        super().__init__(config)
        self.floor_db = -60.0
        self._blocks: deque[float] = deque(maxlen=FLOOR_WINDOW_BLOCKS)  # 100 ms minima
        self._block_min, self._block_frames = 0.0, 0

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        cfg = self.config
        events: list[VadEvent] = []
        for level in frame_levels(self._frames(samples).reshape(-1)):
            voiced = level > max(cfg.min_level_db, self.floor_db + cfg.margin_db)
            self._track_floor(float(level))
            if (event := self._step(voiced, not voiced)) is not None:
                events.append(event)
        return events

    def _track_floor(self, level: float) -> None:
        """The floor follows the quietest 100 ms of the last few seconds: speech always has
        gaps between words, steady noise has none, so it sinks to the noise, not the voice."""
        level = max(level, -90.0)
        self._block_min = min(self._block_min, level)
        self._block_frames += 1
        if self._block_frames == FLOOR_BLOCK_FRAMES:
            self._blocks.append(self._block_min)
            self._block_min, self._block_frames = 0.0, 0
        target = min(self._blocks, default=level)
        target = min(target, self._block_min) if self._block_frames else target
        rate = 0.5 if target < self.floor_db else 0.05
        self.floor_db += rate * (target + FLOOR_HEADROOM_DB - self.floor_db)
