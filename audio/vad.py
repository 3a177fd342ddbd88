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


class EnergyVad:
    """Streaming detector: feed audio of any length, get start/stop events in stream samples."""

    def __init__(self, config: VadConfig | None = None) -> None:
        self.config = config or VadConfig()
        self._rest = np.zeros(0, dtype=np.float32)  # samples short of a whole frame
        self._frame = 0  # frames consumed
        self.floor_db = -60.0
        self.speaking = False
        self._run = 0  # consecutive voiced frames (before a start), silent ones (after)
        self.last_voiced = 0  # stream position where the last voiced frame ended
        self._blocks: deque[float] = deque(maxlen=FLOOR_WINDOW_BLOCKS)  # 100 ms minima
        self._block_min, self._block_frames = 0.0, 0

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        cfg = self.config
        data = np.concatenate([self._rest, samples]) if len(self._rest) else samples
        levels = frame_levels(data)
        self._rest = data[len(levels) * FRAME_SAMPLES:].copy()
        events: list[VadEvent] = []
        start_frames = max(1, round(cfg.start_ms / 1000 / FRAME_S))
        stop_frames = max(1, round(cfg.silence_duration_ms / 1000 / FRAME_S))
        pad_frames = round(cfg.prefix_padding_ms / 1000 / FRAME_S)
        for level in levels:
            voiced = level > max(cfg.min_level_db, self.floor_db + cfg.margin_db)
            self._track_floor(float(level))
            if voiced:
                self.last_voiced = (self._frame + 1) * FRAME_SAMPLES
            if not self.speaking:
                self._run = self._run + 1 if voiced else 0
                if self._run >= start_frames:
                    self.speaking = True
                    onset = self._frame + 1 - self._run - pad_frames
                    events.append(VadEvent("start", max(0, onset) * FRAME_SAMPLES,
                                          (self._frame + 1) * FRAME_SAMPLES))
                    self._run = 0
            else:
                self._run = 0 if voiced else self._run + 1
                if self._run >= stop_frames:
                    self.speaking = False
                    end = self._frame + 1 - self._run
                    events.append(VadEvent("stop", end * FRAME_SAMPLES,
                                          (self._frame + 1) * FRAME_SAMPLES))
                    self._run = 0
            self._frame += 1
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

    @property
    def silent_ms(self) -> float:
        """How long the speech has paused so far (0 when not speaking)."""
        return self._run * FRAME_S * 1000 if self.speaking else 0.0

    @property
    def position(self) -> int:
        """Samples consumed in whole frames."""
        return self._frame * FRAME_SAMPLES
