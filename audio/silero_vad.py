"""Silero VAD as a streaming turn detector: its ONNX model through onnxruntime over 16 kHz PCM (API workers, torch-free).

The model (a small recurrent network; the `silero-vad` pip package ships its weights) gives a
speech probability for each 32 ms window of audio, carrying its recurrent state and the last
64 samples from one window to the next. The model file is found through the package's spec
without importing it (its `__init__` imports torch) and run with onnxruntime on one thread; one
inference session serves every realtime session of the worker, each with its own state.

Turn logic is the energy detector's (audio/vad.py), on probabilities instead of levels: speech
starts after `start_ms` of windows at or above `threshold` (reported `prefix_padding_ms`
earlier) and stops after `silence_duration_ms` of windows below `threshold - 0.15` (Silero's
hysteresis, so a dip inside a word does not count as silence).
"""

from __future__ import annotations

import importlib.util
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fornax.audio.vad import SAMPLE_RATE, VadConfig, VadEvent

logger = logging.getLogger(__name__)

FRAME_SAMPLES = 512  # the model's window at 16 kHz (32 ms)
FRAME_S = FRAME_SAMPLES / SAMPLE_RATE
CONTEXT_SAMPLES = 64  # samples of the previous window the model sees before each one
STATE_SHAPE = (2, 1, 128)
HYSTERESIS = 0.15  # speech goes on until the probability falls below threshold - this
MODEL_FILE = "silero_vad.onnx"


def model_path() -> Path | None:
    """The ONNX model inside the installed `silero-vad` package (None when it is missing)."""
    try:
        spec = importlib.util.find_spec("silero_vad")  # locates it; nothing is executed
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "data" / MODEL_FILE
        if path.is_file():
            return path
    return None


@lru_cache(maxsize=1)
def _session() -> Any:
    import onnxruntime as ort

    path = model_path()
    if path is None:
        raise RuntimeError("the silero-vad package (its ONNX model) is not installed")
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options,
                                providers=["CPUExecutionProvider"])


@lru_cache(maxsize=1)
def available() -> bool:
    """Whether the model loads (onnxruntime and the silero-vad package are installed)."""
    try:
        _session()
    except Exception as exc:  # noqa: BLE001 - any failure means: use the energy detector
        logger.warning("silero VAD unavailable (%s): the energy detector is used", exc)
        return False
    return True


class SileroVad:
    """Streaming detector with EnergyVad's interface: feed audio of any length, get start/stop
    events in stream samples."""

    def __init__(self, config: VadConfig | None = None) -> None:
        self.config = config or VadConfig()
        self._session = _session()
        self._state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self._rest = np.zeros(0, dtype=np.float32)
        self._frame = 0  # windows consumed
        self.speaking = False
        self._run = 0  # consecutive voiced windows (before a start), silent ones (after)
        self.last_voiced = 0  # stream position where the last voiced window ended
        self.last_probability = 0.0

    def probability(self, window: np.ndarray) -> float:
        """Speech probability of the next 512 samples (advances the model's state)."""
        x = np.concatenate([self._context, window])[None, :]
        out, self._state = self._session.run(None, {"input": x, "state": self._state,
                                                    "sr": self._sr})
        self._context = window[-CONTEXT_SAMPLES:].copy()
        return float(out[0, 0])

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        cfg = self.config
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        data = np.concatenate([self._rest, samples]) if len(self._rest) else samples
        n = len(data) // FRAME_SAMPLES
        self._rest = data[n * FRAME_SAMPLES:].copy()
        events: list[VadEvent] = []
        start_frames = max(1, round(cfg.start_ms / 1000 / FRAME_S))
        stop_frames = max(1, round(cfg.silence_duration_ms / 1000 / FRAME_S))
        pad_frames = round(cfg.prefix_padding_ms / 1000 / FRAME_S)
        threshold = min(max(cfg.threshold, 0.0), 1.0)
        for i in range(n):
            prob = self.probability(data[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES])
            self.last_probability = prob
            end_sample = (self._frame + 1) * FRAME_SAMPLES
            voiced = prob >= threshold
            if voiced:
                self.last_voiced = end_sample
            if not self.speaking:
                self._run = self._run + 1 if voiced else 0
                if self._run >= start_frames:
                    self.speaking = True
                    onset = self._frame + 1 - self._run - pad_frames
                    events.append(VadEvent("start", max(0, onset) * FRAME_SAMPLES, end_sample))
                    self._run = 0
            else:
                silent = prob < threshold - HYSTERESIS
                self._run = self._run + 1 if silent else 0
                if self._run >= stop_frames:
                    self.speaking = False
                    end = self._frame + 1 - self._run
                    events.append(VadEvent("stop", end * FRAME_SAMPLES, end_sample))
                    self._run = 0
            self._frame += 1
        return events

    @property
    def silent_ms(self) -> float:
        """How long the speech has paused so far (0 when not speaking)."""
        return self._run * FRAME_S * 1000 if self.speaking else 0.0

    @property
    def position(self) -> int:
        """Samples consumed in whole windows."""
        return self._frame * FRAME_SAMPLES
