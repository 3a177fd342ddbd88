"""Silero VAD as a streaming turn detector: its ONNX model through onnxruntime over 16 kHz PCM (API workers, torch-free).

The model (a small recurrent network; the `silero-vad` pip package ships its weights) gives a
speech probability for each 32 ms window of audio, carrying its recurrent state and the last
64 samples from one window to the next. The model file is found through the package's spec
without importing it (its `__init__` imports torch) and run with onnxruntime on one thread; one
inference session serves every realtime session of the worker, each with its own state.

Turn logic is the energy detector's (`TurnDetector`, audio/vad.py) on probabilities: speech
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

from fornax.audio.vad import SAMPLE_RATE, TurnDetector, VadConfig, VadEvent

logger = logging.getLogger(__name__)

FRAME_SAMPLES = 512  # the model's window at 16 kHz (32 ms)
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


class SileroVad(TurnDetector):
    """Streaming detector with EnergyVad's interface: feed audio of any length, get start/stop
    events in stream samples."""

    frame_samples = FRAME_SAMPLES

    def __init__(self, config: VadConfig | None = None) -> None:
        super().__init__(config)
        self._session = _session()
        self._state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.last_probability = 0.0

    def probability(self, window: np.ndarray) -> float:
        """Speech probability of the next 512 samples (advances the model's state)."""
        x = np.concatenate([self._context, window])[None, :]
        out, self._state = self._session.run(None, {"input": x, "state": self._state,
                                                    "sr": self._sr})
        self._context = window[-CONTEXT_SAMPLES:].copy()
        return float(out[0, 0])

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        threshold = min(max(self.config.threshold, 0.0), 1.0)
        events: list[VadEvent] = []
        for window in self._frames(samples):
            prob = self.last_probability = self.probability(window)
            if (event := self._step(prob >= threshold, prob < threshold - HYSTERESIS)) is not None:
                events.append(event)
        return events
