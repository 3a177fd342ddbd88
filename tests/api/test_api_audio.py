"""/v1/audio/transcriptions and /v1/audio/translations against a real `fornax serve` (packaged
Whisper): the openai client, every response format, streaming, and bad uploads."""

from __future__ import annotations

import concurrent.futures
import io
import re

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from fornax.audio.decode import decode_audio
from helpers.api_server import serving, sse_events
from helpers.whisper_fixtures import (
    AUDIO_DIR,
    manifest,
    normalize_words,
    packaged_whisper,
    word_error_rate,
)

pytestmark = pytest.mark.slow
LIMIT_MB = 0.25


@pytest.fixture(scope="module")
def server():
    packaged_whisper("whisper-tiny.en")  # `make install` installs it: fails when missing
    with serving("whisper-tiny.en", "--max-audio-filesize-mb", str(LIMIT_MB),
                 "--max-num-seqs", "8") as server:
        yield server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def two_sentences() -> bytes:
    """Two fixture sentences with a pause, as OGG (small enough for the upload limit)."""
    a = decode_audio((AUDIO_DIR / "en_02.flac").read_bytes())
    b = decode_audio((AUDIO_DIR / "en_04.flac").read_bytes())
    buf = io.BytesIO()
    sf.write(buf, np.concatenate([a, np.zeros(12000, np.float32), b]), 16000, format="OGG")
    return buf.getvalue()


SHORT = manifest()["short"]


def _file(name: str):
    return (name, (AUDIO_DIR / name).read_bytes())


def test_openai_client_json_and_text(client):
    out = client.audio.transcriptions.create(model="whisper-tiny.en", file=_file("en_03.flac"))
    assert word_error_rate([SHORT["en_03.flac"]], [out.text]) <= 0.15
    text = client.audio.transcriptions.create(model="whisper-tiny.en", file=_file("en_03.flac"),
                                              response_format="text")
    assert isinstance(text, str) and text.strip() == out.text


def test_srt_and_vtt_parse_with_increasing_timestamps(client, two_sentences):
    srt = client.audio.transcriptions.create(model="whisper-tiny.en", response_format="srt",
                                             file=("two.ogg", two_sentences))
    blocks = [b.split("\n") for b in srt.strip().split("\n\n")]
    assert len(blocks) >= 2
    last = -1.0
    for i, block in enumerate(blocks, start=1):
        assert block[0] == str(i) and block[2].strip()
        m = re.fullmatch(r"(\d\d):(\d\d):(\d\d),(\d{3}) --> (\d\d):(\d\d):(\d\d),(\d{3})", block[1])
        assert m, block[1]
        h1, m1, s1, ms1, h2, m2, s2, ms2 = map(int, m.groups())
        start, end = h1 * 3600 + m1 * 60 + s1 + ms1 / 1000, h2 * 3600 + m2 * 60 + s2 + ms2 / 1000
        assert last <= start < end
        last = end
    vtt = client.audio.transcriptions.create(model="whisper-tiny.en", response_format="vtt",
                                             file=("two.ogg", two_sentences))
    assert vtt.startswith("WEBVTT\n\n")
    cues = re.findall(r"^(\d\d:\d\d:\d\d\.\d{3}) --> (\d\d:\d\d:\d\d\.\d{3})$", vtt, re.MULTILINE)
    assert len(cues) == len(blocks) and all(a < b for a, b in cues)
    assert [c[0] for c in cues] == sorted(c[0] for c in cues)


def test_verbose_json_segments_and_words(client, two_sentences):
    out = client.audio.transcriptions.create(
        model="whisper-tiny.en", file=("two.ogg", two_sentences), response_format="verbose_json",
        timestamp_granularities=["word", "segment"])
    assert out.language == "english" and 10 < out.duration < 14
    assert len(out.segments) >= 2 and all(s.end > s.start for s in out.segments)
    words = out.words
    assert [normalize_words(w.word)[0] for w in words[:3]] == ["the", "weather", "is"]
    starts = [w.start for w in words]
    assert starts == sorted(starts) and all(w.end >= w.start for w in words)
    assert words[-1].end <= out.duration + 0.5 and words[-1].start > 6  # second sentence late


def test_stream_deltas_add_up_to_the_done_text(client, server):
    stream = client.audio.transcriptions.create(model="whisper-tiny.en", stream=True,
                                                file=_file("en_04.flac"))
    events = list(stream)
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    done = [e for e in events if e.type == "transcript.text.done"]
    assert len(deltas) > 3 and len(done) == 1
    assert "".join(deltas) == done[0].text
    assert word_error_rate([SHORT["en_04.flac"]], [done[0].text]) <= 0.15
    raw = httpx.post(server.url + "/v1/audio/transcriptions", files={"file": _file("en_04.flac")},
                     data={"stream": "true"}, timeout=120)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert sse_events(raw.text)[-1] == "[DONE]"


def test_stream_of_a_long_file_sends_whole_segments(server):
    """Past 30 s, windows decode with timestamps: deltas are closed segments, never retracted."""
    names = list(SHORT)[:7]
    parts = []
    for name in names:
        parts += [decode_audio((AUDIO_DIR / name).read_bytes()), np.zeros(8000, np.float32)]
    audio = np.concatenate(parts)
    assert len(audio) > 30 * 16000
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="OGG")
    r = httpx.post(server.url + "/v1/audio/transcriptions", files={"file": ("long.ogg",
                   buf.getvalue())}, data={"stream": "true"}, timeout=180)
    events = sse_events(r.text)
    deltas = [e["delta"] for e in events[:-1] if e["type"] == "transcript.text.delta"]
    done = [e for e in events[:-1] if e["type"] == "transcript.text.done"]
    assert len(deltas) >= len(names) - 1 and len(done) == 1
    assert "".join(deltas) == done[0]["text"]
    assert word_error_rate([" ".join(SHORT[n] for n in names)], [done[0]["text"]]) <= 0.15


def test_concurrent_uploads_share_the_engine(server):
    names = list(SHORT)[:4]

    def one(name: str) -> str:
        r = httpx.post(server.url + "/v1/audio/transcriptions", files={"file": _file(name)},
                       timeout=180)
        r.raise_for_status()
        return r.json()["text"]

    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        texts = list(pool.map(one, names))
    assert word_error_rate([SHORT[n] for n in names], texts) <= 0.15
    metrics = httpx.get(server.url + "/metrics").text
    done = re.search(r'^vllm:request_success_total\{[^}]*finished_reason="stop"[^}]*\} (\S+)',
                     metrics, re.MULTILINE)
    assert done and float(done.group(1)) >= len(names)


def test_bad_uploads_are_4xx_and_the_server_keeps_serving(server, client):
    url = server.url + "/v1/audio/transcriptions"
    flac = (AUDIO_DIR / "en_00.flac").read_bytes()
    wav = io.BytesIO()
    sf.write(wav, decode_audio(flac), 16000, format="WAV")
    big = (AUDIO_DIR / "en_long.ogg").read_bytes()
    assert len(big) > LIMIT_MB * 1024 * 1024
    cases = [
        ({"file": ("notes.txt", b"hello, this is not audio at all\n" * 40)}, {}, 400, "decode"),
        ({"file": ("empty.wav", b"")}, {}, 400, "empty"),
        ({"file": ("cut.flac", flac[: len(flac) // 3])}, {}, 400, "decode"),
        ({"file": ("cut.wav", wav.getvalue()[:30000])}, {}, 400, "truncated"),
        ({"file": ("voice.m4a", b"\x00\x00\x00\x20ftypM4A " + bytes(300))}, {}, 400, "decode"),
        ({"file": ("big.ogg", big)}, {}, 413, "limit"),
        ({"audio": ("a.flac", flac)}, {}, 400, "file"),
        ({"file": ("a.flac", flac)}, {"response_format": "docx"}, 400, "response_format"),
        ({"file": ("a.flac", flac)}, {"language": "xx-klingon"}, 400, "language"),
        ({"file": ("a.flac", flac)}, {"temperature": "7"}, 400, "temperature"),
        ({"file": ("a.flac", flac)}, {"timestamp_granularities[]": "word"}, 400,
         "verbose_json"),
        ({"file": ("a.flac", flac)}, {"model": "no-such-model"}, 404, "does not exist"),
    ]
    for files, data, status, words in cases:
        r = httpx.post(url, files=files, data=data, timeout=60)
        assert r.status_code == status, (files.keys(), data, r.text)
        assert words in r.json()["error"]["message"]
    broken = httpx.post(url, content=b"--xyz\r\nContent-Disposition: form-data; name=\"file\"",
                        headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert broken.status_code == 400 and "malformed" in broken.json()["error"]["message"]
    not_form = httpx.post(url, json={"file": "abc"})
    assert not_form.status_code == 400
    with pytest.raises(openai.BadRequestError, match="English-only"):
        client.audio.translations.create(model="whisper-tiny.en", file=_file("en_00.flac"))
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/health?deep=1", timeout=30).status_code == 200
    ok = client.audio.transcriptions.create(model="whisper-tiny.en", file=_file("en_06.flac"))
    assert word_error_rate([SHORT["en_06.flac"]], [ok.text]) <= 0.2


@pytest.fixture(scope="module")
def base_server():
    packaged_whisper("whisper-base")  # `make install` installs it: fails when missing
    with serving("whisper-base") as server:
        yield server


def test_german_over_http_with_the_multilingual_model(base_server):
    server = base_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    (name, _), = manifest()["german"].items()
    english = client.audio.translations.create(model="whisper-base", file=_file(name),
                                               response_format="verbose_json")
    assert english.language == "german"  # detected: translations take no language
    assert {"weather", "park", "today"} <= set(normalize_words(english.text))
    german = client.audio.transcriptions.create(model="whisper-base", file=_file(name),
                                                language="de", response_format="verbose_json")
    assert german.language == "german"
    assert {"heute", "park"} <= set(normalize_words(german.text))
