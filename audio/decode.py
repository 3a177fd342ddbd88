"""Decode uploaded audio to 16 kHz mono float32 (API workers, torch-free).

soundfile (libsndfile) reads WAV, FLAC, OGG/Vorbis/Opus, MP3 and more from memory; audioread
(librosa's loader: ffmpeg or gstreamer where installed) is the fallback for containers libsndfile
cannot open (MP4/M4A, WebM, AAC, AMR, WMA). Channels are averaged, the rate is converted with soxr
(librosa's default resampler). Every failure is an `AudioDecodeError` with a message meant for
the client: the caller turns it into a 400.

Memory is bounded on every path: the duration cap is counted in samples at the model's rate
(16 kHz), whatever the file's own rate. A file whose header declares more is refused before any
decoding; otherwise it is decoded in blocks of bounded size, each block mixed down and resampled
to 16 kHz at once, and decoding stops as soon as the cap is passed (a header that lies gains
nothing). Sample rates, channel counts and block sizes are bounded too.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np

from fornax.audio.features import SAMPLE_RATE

logger = logging.getLogger(__name__)

DEFAULT_MAX_SECONDS = 2 * 3600  # decoded audio beyond this is refused (--max-audio-seconds)
MAX_CHANNELS = 64  # interleaved channels of one file
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 768_000  # a file's own rate, in Hz
_BLOCK_SAMPLES = 1 << 18  # interleaved samples decoded per block (frames = this // channels)
_MAX_WAV_CHUNKS = 4096  # RIFF chunks scanned for the data chunk's size check


class AudioDecodeError(ValueError):
    """The upload is not audio fornax can decode; the message says why."""


class AudioTooLongError(AudioDecodeError):
    """The audio passes the duration cap (from its header, or while decoding)."""


def decode_audio(data: bytes, filename: str | None = None,
                 max_seconds: float = DEFAULT_MAX_SECONDS) -> np.ndarray:
    """Bytes of an audio file -> [samples] float32 mono at 16 kHz, at most `max_seconds` long
    (AudioTooLongError beyond it, found from the header where it can be)."""
    if not data:
        raise AudioDecodeError("the audio file is empty")
    missing = wav_missing_bytes(data)
    if missing:
        raise AudioDecodeError(f"the WAV file is truncated: its data chunk lacks {missing} bytes")
    try:
        audio = _read_soundfile(data, max_seconds)
    except AudioDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - libsndfile raises generic errors; all are a 400
        first = _describe(exc)
        try:
            if not _other_container(data):
                raise ValueError(first)
            audio = _read_audioread(data, max_seconds)
        except AudioDecodeError:
            raise
        except Exception:  # noqa: BLE001 - whatever audioread raises, the upload is bad
            name = f" ({filename})" if filename else ""
            raise AudioDecodeError(
                f"could not decode the audio file{name}: {first}; supported formats are wav, "
                "flac, ogg (vorbis, opus), mp3 and the other formats of libsndfile (and, where "
                "ffmpeg is installed, m4a/aac/webm through audioread)") from None
    if audio.size == 0:
        raise AudioDecodeError("the audio file holds no samples (empty or truncated)")
    return audio


class _Mono16k:
    """Blocks at the file's rate -> mono float32 at 16 kHz, resampled as they come; refuses
    (AudioTooLongError) as soon as the output passes the cap, counted at 16 kHz."""

    def __init__(self, rate: int, channels: int, max_seconds: float,
                 declared_frames: int | None) -> None:
        if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise AudioDecodeError(f"the audio file declares a sample rate of {rate} Hz; "
                                   f"{MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz are accepted")
        if not 1 <= channels <= MAX_CHANNELS:
            raise AudioDecodeError(f"the audio file declares {channels} channels; 1 to "
                                   f"{MAX_CHANNELS} are accepted")
        self.max_seconds = max_seconds
        self.max_samples = int(max_seconds * SAMPLE_RATE)
        if declared_frames is not None and declared_frames / rate > max_seconds:
            raise AudioTooLongError(f"the audio is {declared_frames / rate:.1f} s long (from "
                                    f"its header), longer than the limit of {max_seconds:g} s")
        self.rate, self.channels = rate, channels
        self.block_frames = max(1, _BLOCK_SAMPLES // channels)
        self._parts: list[np.ndarray] = []
        self.num_samples = 0
        self._stream: Any = None
        if rate != SAMPLE_RATE:
            import soxr

            self._stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32",
                                               quality="HQ")

    def add(self, block: np.ndarray) -> None:
        """One [frames, channels] float32 block."""
        if len(block) == 0:
            return
        mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
        if not np.isfinite(mono).all():
            raise AudioDecodeError("the audio file holds NaN or infinite samples")
        self._keep(self._stream.resample_chunk(mono) if self._stream is not None
                   else np.array(mono, dtype=np.float32))

    def finish(self) -> np.ndarray:
        if self._stream is not None:
            self._keep(self._stream.resample_chunk(np.zeros(0, np.float32), last=True))
        if not self._parts:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._parts).astype(np.float32, copy=False)

    def _keep(self, out: np.ndarray) -> None:
        self.num_samples += len(out)
        if self.num_samples > self.max_samples:
            raise AudioTooLongError(f"the audio is longer than the limit of {self.max_seconds:g} "
                                    "s (decoding stopped there)")
        if len(out):
            self._parts.append(out)


def wav_missing_bytes(data: bytes) -> int:
    """Bytes a RIFF/WAVE file's data chunk declares beyond the end of the upload (0 if whole).

    Streaming writers leave the size 0 or 0xFFFFFFFF (unknown): those count as whole.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return 0
    pos = 12
    for _ in range(_MAX_WAV_CHUNKS):  # a file of tiny chunks must not cost a Python loop each
        if pos + 8 > len(data):
            break
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


def _read_soundfile(data: bytes, max_seconds: float, trust_header: bool = True) -> np.ndarray:
    import soundfile as sf

    with sf.SoundFile(io.BytesIO(data)) as f:
        rate, declared, fmt = int(f.samplerate), int(f.frames), f.format
        known = 0 < declared < (1 << 62)  # libsndfile says 2**63 - 1 when it cannot tell
        out = _Mono16k(rate, int(f.channels), max_seconds,
                       declared if known and trust_header else None)
        total = 0
        while True:
            block = f.read(out.block_frames, dtype="float32", always_2d=True)
            if len(block) == 0:
                break
            total += len(block)
            out.add(block)
    if known and total < declared * 0.99 and fmt != "WAV":
        raise AudioDecodeError(f"the audio file is truncated: it declares {declared} frames but "
                               f"only {total} could be decoded")
    return out.finish()


# containers libsndfile does not read: worth handing to librosa/audioread (ffmpeg, gstreamer)
_OTHER_CONTAINERS = (b"\x1a\x45\xdf\xa3", b"#!AMR", b"\x30\x26\xb2\x75", b"\xff\xf1", b"\xff\xf9")


def _other_container(data: bytes) -> bool:
    return data[4:8] == b"ftyp" or data.startswith(_OTHER_CONTAINERS)


def _read_audioread(data: bytes, max_seconds: float, trust_header: bool = True) -> np.ndarray:
    """audioread (what librosa.load falls back to) through a temporary file (its backends need
    a path), block by block under the same cap; leaving early stops the decoder process."""
    import tempfile

    import audioread

    with tempfile.NamedTemporaryFile(suffix=".audio") as tmp:
        tmp.write(data)
        tmp.flush()
        with audioread.audio_open(tmp.name) as f:
            rate, channels = int(f.samplerate), int(f.channels)
            duration = float(f.duration or 0)
            declared = int(duration * rate) if trust_header and 0 < duration < 1e9 else None
            out = _Mono16k(rate, channels, max_seconds, declared)
            pending = bytearray()
            step = 2 * channels * out.block_frames
            for buf in f:  # 16-bit little-endian interleaved PCM, in the decoder's block sizes
                pending.extend(buf)
                if len(pending) >= step:
                    usable = len(pending) - len(pending) % (2 * channels)
                    out.add(_pcm16_frames(bytes(pending[:usable]), channels))
                    del pending[:usable]
            usable = len(pending) - len(pending) % (2 * channels)
            out.add(_pcm16_frames(bytes(pending[:usable]), channels))
    return out.finish()


def _pcm16_frames(raw: bytes, channels: int) -> np.ndarray:
    samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    return samples.reshape(-1, channels)


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
