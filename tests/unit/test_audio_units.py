"""Audio pieces without a model: log-mel parity with HF, decoding, multipart, subtitles, DTW."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import soundfile as sf

from fornax.api.multipart import MultipartError, parse_header_params, parse_multipart
from fornax.audio.decode import AudioDecodeError, decode_audio
from fornax.audio.features import N_SAMPLES, log_mel_spectrogram
from fornax.audio.formats import format_timestamp, to_srt, to_vtt
from fornax.audio.languages import language_code
from fornax.audio.transcribe import Segment
from fornax.runtime.encoder_decoder.alignment import dtw, median_filter
from helpers.whisper_fixtures import AUDIO_DIR


def _speech() -> np.ndarray:
    return decode_audio((AUDIO_DIR / "en_00.flac").read_bytes())


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_hf_feature_extractor(n_mels: int):
    from transformers import WhisperFeatureExtractor

    audio = _speech()
    fe = WhisperFeatureExtractor(feature_size=n_mels)
    ours = log_mel_spectrogram(audio, n_mels, pad_to=N_SAMPLES)
    ref_np = fe._np_extract_fbank_features(np.pad(audio, (0, N_SAMPLES - len(audio)))[None],
                                           "cpu")[0]
    ref = fe(audio, sampling_rate=16000, return_tensors="np").input_features[0]
    assert ours.shape == ref.shape == (n_mels, 3000)
    assert np.abs(ours - ref_np).max() < 1e-5
    assert np.abs(ours - ref).max() < 2e-4  # HF's default path is torch's STFT


def test_long_audio_features_are_one_pass_and_sliceable():
    audio = np.random.default_rng(0).normal(0, 0.1, 16000 * 70).astype(np.float32)
    mel = log_mel_spectrogram(audio, 80, pad_to=len(audio) + N_SAMPLES)
    assert mel.shape == (80, (len(audio) + N_SAMPLES) // 160)
    assert mel.dtype == np.float32 and np.isfinite(mel).all()


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_decode_formats_channels_and_rates(fmt: str):
    audio = _speech()
    t = np.arange(len(audio)) / 16000
    stereo = np.stack([audio, audio * 0.5 + 0.01 * np.sin(t)], axis=1)
    buf = io.BytesIO()
    sf.write(buf, stereo, 22050, format=fmt)  # written as if 22.05 kHz: decode must resample
    decoded = decode_audio(buf.getvalue())
    expected = len(audio) * 16000 / 22050
    assert abs(len(decoded) - expected) < 0.02 * expected + 1200  # MP3 adds codec padding
    assert decoded.dtype == np.float32 and np.abs(decoded).max() <= 1.5


def test_decode_errors_name_the_problem():
    good = (AUDIO_DIR / "en_00.flac").read_bytes()
    wav = io.BytesIO()
    sf.write(wav, _speech(), 16000, format="WAV")
    cases = {
        b"": "empty",
        b"this is plainly text, not audio at all" * 20: "could not decode",
        good[: len(good) // 3]: "could not decode",  # truncated FLAC
        wav.getvalue()[:20000]: "truncated",
        b"%PDF-1.4 not audio" + bytes(200): "could not decode",
    }
    for data, words in cases.items():
        with pytest.raises(AudioDecodeError, match=words):
            decode_audio(data)
    with pytest.raises(AudioDecodeError, match="longer than"):
        decode_audio(good, max_seconds=1.0)


def test_multipart_parser_fields_files_and_errors():
    import httpx

    req = httpx.Request("POST", "http://x/", data={"model": "m", "timestamp_granularities[]":
                                                   ["word", "segment"]},
                        files={"file": ('we"ird;name.wav', b"RIFF\r\n--not-a-boundary\r\n",
                                        "audio/wav")})
    body, ctype = req.read(), req.headers["content-type"]
    parts = parse_multipart(body, ctype)
    assert [(p.name, p.data) for p in parts[:3]] == [
        ("model", b"m"), ("timestamp_granularities[]", b"word"),
        ("timestamp_granularities[]", b"segment")]
    assert parts[3].filename is not None and parts[3].data == b"RIFF\r\n--not-a-boundary\r\n"
    assert parse_header_params("form-data; name=\"f\"; filename*=UTF-8''%C3%A4.wav")[1] == {
        "name": "f", "filename": "ä.wav"}
    for bad_body, bad_type in [(body[:-12], ctype), (body[:40], ctype), (b"", ctype),
                               (body, "application/json"), (body, None),
                               (body, "multipart/form-data")]:
        with pytest.raises(MultipartError):
            parse_multipart(bad_body, bad_type)


def test_srt_and_vtt_render_increasing_timestamps():
    segs = [Segment(0, 0, 0.0, 2.5, " Hello there.", [], 0.0, 0.0, 1.0),
            Segment(1, 0, 2.5, 3661.25, " A --> B", [], 0.0, 0.0, 1.0)]
    srt = to_srt(segs)
    assert srt.startswith("1\n00:00:00,000 --> 00:00:02,500\nHello there.\n")
    assert "2\n00:00:02,500 --> 01:01:01,250\nA -> B\n" in srt
    vtt = to_vtt(segs)
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nHello there.\n")
    assert format_timestamp(59.9996) == "01:00.000"
    times = re.findall(r"(\d\d:\d\d:\d\d\.\d\d\d) --> (\d\d:\d\d:\d\d\.\d\d\d)", vtt)
    assert len(times) == 2 and all(a < b for a, b in times)


def test_language_codes():
    assert language_code("German") == "de" and language_code("de-DE") == "de"
    assert language_code("EN") == "en" and language_code("mandarin") == "zh"
    assert language_code("klingon") is None


def _dtw_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenAI's dtw_cpu, loop for loop."""
    n, m = x.shape
    cost = np.full((n + 1, m + 1), np.inf)
    trace = -np.ones((n + 1, m + 1))
    cost[0, 0] = 0
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            cost[i, j] = x[i - 1, j - 1] + c
            trace[i, j] = t
    i, j = n, m
    trace[0, :], trace[:, 0] = 2, 1
    path = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        if trace[i, j] == 0:
            i, j = i - 1, j - 1
        elif trace[i, j] == 1:
            i -= 1
        else:
            j -= 1
    arr = np.array(path[::-1]).T
    return arr[0], arr[1]


def test_vectorized_dtw_matches_openai_reference():
    rng = np.random.default_rng(1)
    for shape in [(5, 40), (12, 30), (1, 7), (9, 9)]:
        x = rng.normal(size=shape)
        ours, ref = dtw(x), _dtw_reference(x)
        assert np.array_equal(ours[0], ref[0]) and np.array_equal(ours[1], ref[1])
    x = np.arange(20, dtype=float).reshape(2, 10)
    assert median_filter(x, 7).shape == x.shape


def test_decode_hands_other_containers_to_audioread(monkeypatch):
    """m4a/webm are not libsndfile's: they go to audioread (which needs ffmpeg to succeed),
    under the same duration cap."""
    import fornax.audio.decode as dec

    seen = []

    def fake_audioread(data: bytes, max_seconds: float):
        seen.append(data[:8])
        assert max_seconds == dec.DEFAULT_MAX_SECONDS
        return np.zeros(16000, dtype=np.float32)

    monkeypatch.setattr(dec, "_read_audioread", fake_audioread)
    m4a = b"\x00\x00\x00\x20ftypM4A " + bytes(100)
    assert len(decode_audio(m4a)) == 16000 and seen == [m4a[:8]]
    with pytest.raises(AudioDecodeError):
        decode_audio(b"not a container at all" * 10)
    assert len(seen) == 1


def test_the_audio_front_end_never_imports_torch():
    """API workers decode, featurize and plan windows without torch (DESIGN: torch-free API)."""
    import subprocess
    import sys

    from helpers.whisper_fixtures import packaged_whisper

    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import fornax.api.server.app, fornax.api.routes.audio\n"
        "from tokenizers import Tokenizer\n"
        "from fornax.audio.decode import decode_audio\n"
        "from fornax.audio.engine_io import engine_request\n"
        "from fornax.audio.transcribe import TranscribeOptions, TranscriptionSession, WhisperInfo\n"
        "path = Path(sys.argv[2])\n"
        "audio = decode_audio(Path(sys.argv[1]).read_bytes())\n"
        "session = TranscriptionSession(audio, WhisperInfo.from_folder(path),\n"
        "    Tokenizer.from_file(str(path / 'tokenizer.json')), TranscribeOptions())\n"
        "engine_request('x', session.next_request())\n"
        "sys.exit(1 if 'torch' in sys.modules else 0)\n")
    args = [sys.executable, "-c", code, str(AUDIO_DIR / "en_00.flac"),
            str(packaged_whisper("whisper-tiny.en"))]
    assert subprocess.run(args, check=False).returncode == 0


def _session(seconds: float, **opts):
    from tokenizers import Tokenizer

    from fornax.audio.transcribe import TranscribeOptions, TranscriptionSession, WhisperInfo
    from helpers.whisper_fixtures import packaged_whisper

    path = packaged_whisper("whisper-tiny.en")
    info = WhisperInfo.from_folder(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    audio = np.random.default_rng(0).normal(0, 0.05, int(seconds * 16000)).astype(np.float32)
    return TranscriptionSession(audio, info, tok, TranscribeOptions(**opts)), info, tok


def test_session_seeks_to_the_last_complete_segment_and_skips_silence():
    from fornax.audio.transcribe import WindowResult

    session, info, tok = _session(70.0)
    tsb, eot = info.timestamp_begin, info.eot
    hello, world = tok.encode(" Hello there.").ids, tok.encode(" Cut off").ids
    first = session.next_request()
    assert first.prompt_token_ids == [info.ids["sot"]] and first.content_frames == 3000
    # <0.00> Hello there. <5.00><5.00> Cut off <eot>: the unfinished tail is decoded again
    tokens = [tsb, *hello, tsb + 250, tsb + 250, *world, eot]
    segs = session.feed(WindowResult(tokens, [-0.1] * len(tokens)))
    assert [(s.start, s.end, s.text) for s in segs] == [(0.0, 5.0, " Hello there.")]
    assert session.seek == 500  # 5 s: where the cut-off segment starts
    second = session.next_request()
    assert second.prompt_token_ids[0] == info.ids["sot_prev"]  # conditioned on earlier text
    assert second.prompt_token_ids[1:-1] == segs[0].tokens
    # a likely-silent window with improbable text is skipped whole, not retried
    assert session.feed(WindowResult([tsb, *world, eot], [-3.0] * 5, no_speech_prob=0.9)) == []
    assert session.seek == 3500 and session._attempt == 0
    # an improbable window with speech is retried at a higher temperature
    third = session.next_request()
    assert session.feed(WindowResult([tsb, *world, eot], [-3.0] * 5, no_speech_prob=0.1)) == []
    retry = session.next_request()
    assert retry.temperature > third.temperature and retry.features is not None
    ending = [tsb, *hello, tsb + 100, eot]  # single timestamp ending: the whole window is done
    session.feed(WindowResult(ending, [-0.1] * len(ending)))
    assert session.seek == 3500 + 3000 and session.next_request() is not None
    assert session.text.startswith("Hello there.")
