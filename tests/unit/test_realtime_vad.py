"""Turn detection for WS /v1/realtime: Silero VAD (the default, ONNX through onnxruntime) and the
energy detector on committed speech fixtures with noise and music added, the detector choice
(`--realtime-vad`) and that loading Silero keeps the process torch-free."""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pytest

from fornax.audio.decode import decode_audio
from fornax.audio.vad import EnergyVad, VadConfig, make_vad
from helpers.whisper_fixtures import AUDIO_DIR

RATE = 16000
LEAD_S, TAIL_S = 2.0, 2.5  # background alone before and after the sentence


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def _music(seconds: float, seed: int = 0) -> np.ndarray:
    """Piano-like chords: three notes with harmonics and a decaying envelope, a new chord
    every 0.5 s, and a soft sustained pad under them (never silent)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    out = np.zeros_like(t)
    step = 0.5
    for k in range(int(np.ceil(seconds / step))):
        root = 220.0 * 2 ** (rng.integers(0, 12) / 12)
        local = t - k * step
        on = (local >= 0) & (local < 2 * step)
        env = np.where(on, np.exp(-3.0 * np.clip(local, 0, None)), 0.0)
        for ratio in (1.0, 1.26, 1.5):
            for h in (1, 2, 3):
                out += env * np.sin(2 * np.pi * root * ratio * h * t) / h
    out += 0.3 * np.sin(2 * np.pi * 110 * t) * (1 + 0.2 * np.sin(2 * np.pi * 0.5 * t))
    return (out / np.abs(out).max()).astype(np.float32)


def _track(background: str, snr_db: float) -> tuple[np.ndarray, float, float]:
    """A committed sentence between LEAD_S and TAIL_S of background at `snr_db` below the
    speech level; returns (audio, speech start s, speech end s)."""
    speech = decode_audio((AUDIO_DIR / "en_02.flac").read_bytes())
    total = LEAD_S + len(speech) / RATE + TAIL_S
    n = int(total * RATE)
    if background == "noise":
        noise = np.random.default_rng(1).normal(0, 1, n).astype(np.float32)
    else:
        noise = _music(total)
    noise *= _rms(speech) / _rms(noise) * 10 ** (-snr_db / 20)
    audio = noise.copy()
    start = int(LEAD_S * RATE)
    audio[start:start + len(speech)] += speech
    loud = np.nonzero(np.abs(speech) > 0.02)[0]
    return (np.clip(audio, -1, 1), (start + loud[0]) / RATE, (start + loud[-1]) / RATE)


def _events(vad, audio: np.ndarray) -> list[tuple[str, float]]:
    out = []
    for pos in range(0, len(audio), 1600):  # 100 ms appends, as clients send
        out += [(e.kind, e.sample / RATE) for e in vad.feed(audio[pos:pos + 1600])]
    return out


def _silero(config: VadConfig | None = None):
    from fornax.audio.silero_vad import SileroVad, available

    assert available(), "the silero-vad package is a dependency (make install)"
    return SileroVad(config)


@pytest.mark.parametrize(("background", "snr_db"), [("noise", 10.0), ("music", 6.0)])
def test_silero_finds_the_sentence_in_noise_and_music(background, snr_db):
    audio, begin, end = _track(background, snr_db)
    events = _events(_silero(), audio)
    # one utterance: from before the speech (the prefix padding) to after it, nothing else
    assert [k for k, _ in events] == ["start", "stop"], events
    (_, start), (_, stop) = events
    assert begin - 0.5 <= start <= begin + 0.1, (events, begin)
    assert end - 0.3 <= stop <= end + 0.6, (events, end)


def test_music_alone_starts_no_turn_with_silero_but_does_with_the_energy_detector():
    music = _music(8.0, seed=2) * 0.3
    music[:3 * RATE] *= 0.1  # a quiet intro: the energy detector's noise floor settles on it
    assert _events(_silero(), music) == []
    # why Silero is the default: to a level detector, the music after the intro is speech
    energy = _events(EnergyVad(), music)
    assert any(k == "start" and t >= 2.5 for k, t in energy), energy


def test_the_detector_choice_and_its_fallback(monkeypatch):
    from fornax.api.server import args as serve_args
    from fornax.audio import silero_vad

    parser = argparse.ArgumentParser()
    serve_args.add_serve_arguments(parser)
    assert serve_args.settings_kwargs(parser.parse_args([]))["realtime_vad"] == "silero"
    given = serve_args.settings_kwargs(parser.parse_args(["--realtime-vad", "energy"]))
    assert given["realtime_vad"] == "energy"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--realtime-vad", "webrtc"])
    assert exc.value.code == 2
    assert isinstance(make_vad(VadConfig(), "silero"), silero_vad.SileroVad)
    assert isinstance(make_vad(VadConfig(), "energy"), EnergyVad)
    silero_vad.available.cache_clear()
    monkeypatch.setattr(silero_vad, "model_path", lambda: None)
    silero_vad._session.cache_clear()
    try:
        assert isinstance(make_vad(VadConfig(), "silero"), EnergyVad)  # not installed: energy
    finally:
        silero_vad.available.cache_clear()
        silero_vad._session.cache_clear()


def test_silero_threshold_and_padding_follow_the_session_settings():
    audio, begin, _ = _track("noise", 20.0)
    early = _events(_silero(VadConfig(prefix_padding_ms=600)), audio)[0][1]
    late = _events(_silero(VadConfig(prefix_padding_ms=0)), audio)[0][1]
    assert 0.5 <= late - early <= 0.7
    strict = _events(_silero(VadConfig(threshold=0.999)), audio)
    assert len(strict) <= len(_events(_silero(), audio))


def test_loading_silero_keeps_the_api_worker_torch_free():
    code = ("import sys, numpy as np; from fornax.audio.vad import make_vad, VadConfig; "
            "v = make_vad(VadConfig(), 'silero'); v.feed(np.zeros(16000, np.float32)); "
            "assert type(v).__name__ == 'SileroVad'; assert 'torch' not in sys.modules, 'torch'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
