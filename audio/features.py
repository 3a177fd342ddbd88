"""Whisper log-mel features in NumPy, matching HF's WhisperFeatureExtractor (API workers, torch-free).

80 (or 128) slaney-scale mel bands of a 400-point periodic-Hann STFT with hop 160 at 16 kHz,
log10 clamped at 1e-10, floored 8 below the maximum, then scaled as (x + 4) / 4. A 30 s window
is 3000 frames; long audio is featurized once and sliced into windows (OpenAI's reference).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000 samples in one window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in one window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100
_STFT_BLOCK_FRAMES = 6000  # bounds the complex STFT's memory on long audio


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    freq = np.asarray(freq, dtype=np.float64)
    min_log_hz, min_log_mel, logstep = 1000.0, 15.0, 27.0 / np.log(6.4)
    mel = 3.0 * freq / 200.0
    log_region = freq >= min_log_hz
    mel = np.where(log_region, min_log_mel + np.log(np.maximum(freq, 1e-10) / min_log_hz)
                   * logstep, mel)
    return mel


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    min_log_hz, min_log_mel, logstep = 1000.0, 15.0, np.log(6.4) / 27.0
    freq = 200.0 * mel / 3.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), freq)


@lru_cache(maxsize=4)
def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sr: int = SAMPLE_RATE) -> np.ndarray:
    """[n_freqs, n_mels] slaney-normalized triangular filters from 0 Hz to sr / 2."""
    n_freqs = 1 + n_fft // 2
    fft_freqs = np.linspace(0, sr // 2, n_freqs)
    mel_pts = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2)
    filter_freqs = _mel_to_hz(mel_pts)
    diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]  # [n_freqs, n_mels + 2]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    enorm = 2.0 / (filter_freqs[2:n_mels + 2] - filter_freqs[:n_mels])
    return filters * enorm[None, :]


@lru_cache(maxsize=2)
def _hann(n_fft: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic


def log_mel_spectrogram(audio: np.ndarray, n_mels: int = 80, pad_to: int = 0) -> np.ndarray:
    """[n_mels, frames] float32 log-mel of 16 kHz mono audio, normalized as Whisper expects.

    `pad_to` pads the audio with zeros to at least that many samples first (N_SAMPLES gives HF's
    fixed 30 s window); the normalization floor is taken over the whole result.
    """
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if pad_to and len(audio) < pad_to:
        audio = np.pad(audio, (0, pad_to - len(audio)))
    if len(audio) < 2:
        audio = np.pad(audio, (0, 2 - len(audio)))
    pad = N_FFT // 2
    mode = "reflect" if len(audio) > pad else "constant"
    padded = np.pad(audio.astype(np.float64), (pad, pad), mode=mode)
    num_frames = 1 + (len(padded) - N_FFT) // HOP_LENGTH
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:num_frames]
    window, filters = _hann(N_FFT), mel_filters(n_mels)
    out = np.empty((n_mels, num_frames), dtype=np.float64)
    for start in range(0, num_frames, _STFT_BLOCK_FRAMES):
        block = frames[start:start + _STFT_BLOCK_FRAMES]
        spec = np.fft.rfft(block * window, n=N_FFT, axis=-1)
        power = spec.real**2 + spec.imag**2  # [frames, n_freqs]
        out[:, start:start + len(block)] = (power @ filters).T
    log_spec = np.log10(np.maximum(out, 1e-10))[:, :-1]  # the last frame is dropped (as HF)
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def window_features(mel: np.ndarray, start_frame: int, n_frames: int = N_FRAMES) -> np.ndarray:
    """The [n_mels, n_frames] window starting at `start_frame`, zero-padded at the end.

    Padding is with the log-mel of silence only where the features were computed over padded
    audio; beyond the computed frames it is 0.0, as HF pads input features.
    """
    window = mel[:, start_frame:start_frame + n_frames]
    if window.shape[1] < n_frames:
        window = np.pad(window, ((0, 0), (0, n_frames - window.shape[1])))
    return np.ascontiguousarray(window, dtype=np.float32)
