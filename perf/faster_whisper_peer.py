"""faster-whisper, the peer of `fornax bench asr --peer faster-whisper` (a child process of the CLI).

faster-whisper (CTranslate2) runs in its own process, `python -m fornax.perf.faster_whisper_peer`, so its
OpenMP runtime never shares a process (or spin-waiting threads) with torch's; the bench sends it one
line per timed run over stdin and reads one JSON line back. It loads the CTranslate2 folder that
fornax's weights were converted from (the packaged model.bin itself), or an HF Whisper folder
converted by ctranslate2's own converter. It is an optional extra (`pip install -c
constraints.txt faster-whisper`, or `fornax[peers]`); nothing in serving imports it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Decoding both sides use: greedy (beam 1), OpenAI's temperature fallback and thresholds,
# conditioned on the previous window's text, timestamps on, no VAD filter, no word timestamps.
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
DECODING = {"beam_size": 1, "best_of": 1, "temperature": list(FALLBACK_TEMPERATURES),
            "compression_ratio_threshold": 2.4, "log_prob_threshold": -1.0,
            "no_speech_threshold": 0.6, "condition_on_previous_text": True,
            "without_timestamps": False, "vad_filter": False, "word_timestamps": False}


def faster_whisper_version() -> str | None:
    """The installed faster-whisper's version, or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("faster-whisper")
    except PackageNotFoundError:
        return None


def ct2_folder(model: str, prepared: Path) -> Path:
    """The CTranslate2 Whisper folder for `model`: the packaged or given CT2 folder as it is, else
    `prepared` (an HF folder) converted once by ctranslate2 into a temporary folder."""
    from fornax.runtime.loaders.speech_models import ct2_source_folder

    source = ct2_source_folder(model)
    if source is not None:
        return source
    from ctranslate2.converters import TransformersConverter

    out = Path(tempfile.mkdtemp(prefix="fornax-ct2-")) / "model"
    TransformersConverter(str(prepared), copy_files=["tokenizer.json"]).convert(str(out))
    return out


class FasterWhisperPeer:
    """A child process holding one faster-whisper model; `run` transcribes the audio once."""

    def __init__(self, folder: Path, audio: np.ndarray, threads: int, compute_type: str) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="fornax-asr-peer-"))
        audio_path = self._dir / "audio.npy"
        np.save(audio_path, audio.astype(np.float32))
        cmd = [sys.executable, "-m", "fornax.perf.faster_whisper_peer", str(folder), str(audio_path),
               str(threads), compute_type]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        hello = self._read()
        self.load_s, self.warmup_s = float(hello["load_s"]), float(hello["warmup_s"])
        self.name = f"faster-whisper {hello['version']} ({compute_type})"

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the faster-whisper peer exited (code {self.proc.wait()})")
        return dict(json.loads(line))

    def run(self, seconds: float | None = None) -> dict[str, Any]:
        """One timed transcription (of the first `seconds`, all when None): elapsed_s, cpu_s,
        text, windows."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"seconds": seconds}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _transcribe(model: Any, audio: np.ndarray) -> tuple[str, int]:
    segments, _ = model.transcribe(audio, language="en", **DECODING)
    segs = list(segments)  # the generator does the work
    return "".join(s.text for s in segs).strip(), len({s.seek for s in segs})


def worker(folder: str, audio_path: str, threads: int, compute_type: str) -> int:
    """The child: load, warm up, then one JSON line per request line on stdin."""
    from faster_whisper import WhisperModel

    audio = np.load(audio_path)
    t0 = time.perf_counter()
    model = WhisperModel(folder, device="cpu", compute_type=compute_type, cpu_threads=threads,
                         num_workers=1)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _transcribe(model, audio[: 16000 * 5])
    hello = {"load_s": load_s, "warmup_s": time.perf_counter() - t0,
             "version": faster_whisper_version()}
    print(json.dumps(hello), flush=True)
    for line in sys.stdin:
        seconds = json.loads(line).get("seconds")
        clip = audio if seconds is None else audio[: int(16000 * seconds)]
        t0, c0 = time.perf_counter(), time.process_time()
        text, windows = _transcribe(model, clip)
        out = {"elapsed_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
               "text": text, "windows": windows}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
