"""Decode uploaded audio to 16 kHz mono float32 (API workers, torch-free).

soundfile (libsndfile) reads WAV, FLAC, OGG/Vorbis/Opus, MP3 and more from memory; librosa (over
audioread, i.e. ffmpeg or gstreamer where installed) is the fallback for containers libsndfile
cannot open (MP4/M4A, WebM, AAC, AMR, WMA). Channels are averaged, the rate is converted with soxr
(librosa's default resampler). Every failure is an `AudioDecodeError` with a message meant for
the client: the caller turns it into a 400.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from fornax.audio.features import SAMPLE_RATE

logger = logging.getLogger(__name__)

DEFAULT_MAX_SECONDS = 2 * 3600  # decoded audio beyond this is refused (memory bound)
_BLOCK_FRAMES = 1 << 18


class AudioDecodeError(ValueError):
    """The upload is not audio fornax can decode; the message says why."""


def decode_audio(data: bytes, filename: str | None = None,
                 max_seconds: float = DEFAULT_MAX_SECONDS) -> np.ndarray:
    """Bytes of an audio file -> [samples] float32 mono at 16 kHz."""
    if not data:
        raise AudioDecodeError("the audio file is empty")
    missing = wav_missing_bytes(data)
    if missing:
        raise AudioDecodeError(f"the WAV file is truncated: its data chunk lacks {missing} bytes")
    try:
        audio, rate = _read_soundfile(data, max_seconds)
    except AudioDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - libsndfile raises generic errors; all are a 400
        first = _describe(exc)
        try:
            if not _other_container(data):
                raise ValueError(first)
            audio, rate = _read_librosa(data)
        except Exception:  # noqa: BLE001 - whatever librosa/audioread raise, the upload is bad
            name = f" ({filename})" if filename else ""
            raise AudioDecodeError(
                f"could not decode the audio file{name}: {first}; supported formats are wav, "
                "flac, ogg (vorbis, opus), mp3 and the other formats of libsndfile (and, where "
                "ffmpeg is installed, m4a/aac/webm through librosa)") from None
    if audio.size == 0:
        raise AudioDecodeError("the audio file holds no samples (empty or truncated)")
    if not np.isfinite(audio).all():
        raise AudioDecodeError("the audio file holds NaN or infinite samples")
    if len(audio) / rate > max_seconds:
        raise AudioDecodeError(f"the audio is {len(audio) / rate:.0f} s long; at most "
                               f"{max_seconds:.0f} s are accepted")
    return resample(audio, rate)


def wav_missing_bytes(data: bytes) -> int:
    """Bytes a RIFF/WAVE file's data chunk declares beyond the end of the upload (0 if whole).

    Streaming writers leave the size 0 or 0xFFFFFFFF (unknown): those count as whole.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return 0
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if chunk == b"data":
            if size in (0, 0xFFFFFFFF) or size >= 0xFFFFFF00:
                return 0
            return max(0, size - (len(data) - pos - 8))
        pos += 8 + size + (size & 1)
    return 0


def _describe(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return text.removeprefix("Error opening <_io.BytesIO object at ").split(">: ")[-1]


def _read_soundfile(data: bytes, max_seconds: float) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with sf.SoundFile(io.BytesIO(data)) as f:
        rate, declared = int(f.samplerate), int(f.frames)
        if rate <= 0:
            raise AudioDecodeError("the audio file declares a sample rate of 0")
        limit = int(max_seconds * rate) + 1
        blocks, total = [], 0
        while True:
            block = f.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
            if len(block) == 0:
                break
            blocks.append(block.mean(axis=1) if block.shape[1] > 1 else block[:, 0])
            total += len(block)
            if total > limit:
                raise AudioDecodeError(f"the audio is longer than the limit of {max_seconds:.0f} s")
    if 0 < declared < (1 << 62) and total < declared * 0.99 and f.format != "WAV":
        raise AudioDecodeError(f"the audio file is truncated: it declares {declared} frames but "
                               f"only {total} could be decoded")
    audio = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
    return audio, rate


# containers libsndfile does not read: worth handing to librosa/audioread (ffmpeg, gstreamer)
_OTHER_CONTAINERS = (b"\x1a\x45\xdf\xa3", b"#!AMR", b"\x30\x26\xb2\x75", b"\xff\xf1", b"\xff\xf9")


def _other_container(data: bytes) -> bool:
    return data[4:8] == b"ftyp" or data.startswith(_OTHER_CONTAINERS)


def _read_librosa(data: bytes) -> tuple[np.ndarray, int]:
    """librosa.load through a temporary file (audioread's backends need a path)."""
    import tempfile

    import librosa

    with tempfile.NamedTemporaryFile(suffix=".audio") as tmp:
        tmp.write(data)
        tmp.flush()
        audio, rate = librosa.load(tmp.name, sr=None, mono=True)
    return np.asarray(audio, dtype=np.float32), int(rate)


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 audio from `rate` to `target` Hz (soxr high quality)."""
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if rate == target:
        return audio
    try:
        import soxr

        return soxr.resample(audio, rate, target, quality="HQ").astype(np.float32, copy=False)
    except ImportError:  # pragma: no cover - soxr comes with librosa
        from scipy.signal import resample_poly

        g = np.gcd(rate, target)
        return resample_poly(audio, target // g, rate // g).astype(np.float32)
