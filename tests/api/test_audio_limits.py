"""Audio bounds: the duration cap counted at the model's 16 kHz and refused from the header
before decoding, decoding in bounded blocks that stop at the cap (soundfile and audioread
paths), garbage uploads as 400s, multipart field caps, and the realtime WebSocket's frame,
buffer and session caps — the server stays up throughout."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random

import httpx
import numpy as np
import pytest
import soundfile as sf

from fornax.audio import decode as decode_mod
from fornax.audio.decode import AudioDecodeError, AudioTooLongError, decode_audio


def _wav(seconds: float, rate: int, channels: int = 1, subtype: str = "PCM_16") -> bytes:
    n = int(seconds * rate)
    t = np.arange(n, dtype=np.float32) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.stack([tone] * channels, axis=1), rate, format="WAV", subtype=subtype)
    return buf.getvalue()


class _CountingReads:
    """Counts the frames soundfile decodes (to show what was, and was not, decoded)."""

    def __init__(self, monkeypatch) -> None:
        self.frames = 0
        real = sf.SoundFile.read

        def read(f, frames=-1, *args, **kwargs):
            out = real(f, frames, *args, **kwargs)
            self.frames += len(out)
            return out

        monkeypatch.setattr(sf.SoundFile, "read", read)


# ---- decoding, no server --------------------------------------------------------------------------
def test_192k_file_over_the_cap_is_refused_from_its_header(monkeypatch) -> None:
    data = _wav(1.0, 192_000)  # 1 s: 192,000 samples at its own rate, 16,000 at the model's
    reads = _CountingReads(monkeypatch)
    with pytest.raises(AudioTooLongError, match="from its header"):
        decode_audio(data, max_seconds=0.5)
    assert reads.frames == 0  # nothing was decoded
    # a 600 s 192 kHz FLAC of silence is a few hundred KB: still refused without decoding
    buf = io.BytesIO()
    sf.write(buf, np.zeros(192_000 * 600, np.float32), 192_000, format="FLAC")
    with pytest.raises(AudioTooLongError, match="600.0 s long"):
        decode_audio(buf.getvalue(), max_seconds=60)
    assert reads.frames == 0


def test_cap_is_counted_at_16k_not_at_the_files_rate() -> None:
    audio = decode_audio(_wav(1.0, 192_000, channels=2), max_seconds=1.5)
    assert abs(len(audio) - 16_000) <= 2 and audio.dtype == np.float32
    assert np.abs(audio).max() > 0.2  # the tone survived the downmix and resampling


def test_untrusted_header_decoding_stops_at_the_cap(monkeypatch) -> None:
    data = _wav(10.0, 48_000)
    reads = _CountingReads(monkeypatch)
    with pytest.raises(AudioTooLongError, match="decoding stopped"):
        decode_mod._read_soundfile(data, 1.0, trust_header=False)  # as if the header lied
    block = decode_mod._BLOCK_SAMPLES
    assert reads.frames <= 48_000 * 1.0 + block < 48_000 * 10  # stopped, not decoded whole


def test_header_declaring_less_than_the_file_holds_is_cut_off() -> None:
    data = bytearray(_wav(3.0, 16_000))
    at = data.find(b"data")
    data[at + 4:at + 8] = (16_000 * 2).to_bytes(4, "little")  # declares 1 s of 16-bit mono
    audio = decode_audio(bytes(data), max_seconds=2.0)
    assert len(audio) == 16_000  # only what the header declares, whatever follows


def test_audioread_fallback_has_the_same_cap() -> None:
    data = _wav(3.0, 44_100, channels=2)
    with pytest.raises(AudioTooLongError, match="from its header"):
        decode_mod._read_audioread(data, 1.0)
    with pytest.raises(AudioTooLongError, match="decoding stopped"):
        decode_mod._read_audioread(data, 1.0, trust_header=False)
    audio = decode_mod._read_audioread(data, 5.0)
    assert abs(len(audio) - 48_000) <= 2


def test_absurd_rates_and_channel_counts_are_refused() -> None:
    data = bytearray(_wav(0.1, 16_000))
    data[24:28] = (4_000_000).to_bytes(4, "little")  # fmt chunk: sample rate
    with pytest.raises(AudioDecodeError, match="sample rate"):
        decode_audio(bytes(data))
    data = bytearray(_wav(0.1, 16_000, channels=1))
    data[22:24] = (1000).to_bytes(2, "little")  # fmt chunk: channels
    with pytest.raises(AudioDecodeError):
        decode_audio(bytes(data))


GARBAGE_HEADS = (b"RIFF\x10\x00\x00\x00WAVEfmt ", b"fLaC\x00\x00\x00\x22", b"OggS\x00\x02",
                 b"ID3\x04\x00\x00\x00\x00\x00\x00", b"\x00\x00\x00\x20ftypM4A ", b"\xff\xfb\x90",
                 b"\x1a\x45\xdf\xa3", b"#!AMR\n", b"FORM\x00\x00\x00\x10AIFF", b".snd")


def _garbage(seed: int) -> bytes:
    rng = random.Random(seed)
    head = GARBAGE_HEADS[seed % len(GARBAGE_HEADS)]
    return head + bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 3000)))


def test_garbage_bytes_are_decode_errors() -> None:
    for seed in range(40):
        try:
            audio = decode_audio(_garbage(seed), max_seconds=5)
        except AudioDecodeError:
            continue
        assert audio.dtype == np.float32 and len(audio) <= 5 * 16_000  # decoded as noise


# ---- a real server (packaged whisper-tiny.en) ----------------------------------------------------
@pytest.fixture(scope="module")
def server():
    from helpers.api_server import ServerProcess
    from helpers.whisper_fixtures import packaged_whisper

    packaged_whisper("whisper-tiny.en")  # `make install` installs it: fails when missing
    proc = ServerProcess("whisper-tiny.en", "--max-audio-seconds", "2",
                         "--max-audio-filesize-mb", "2", "--realtime-max-buffer-seconds", "3",
                         "--realtime-max-sessions", "2").wait_ready()
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def _transcribe(http, data: bytes, name: str = "a.wav", **fields) -> httpx.Response:
    return http.post("/v1/audio/transcriptions", files={"file": (name, data)},
                     data={"model": "whisper-tiny.en", **fields})


def _error(resp: httpx.Response, status: int, param: str | None) -> str:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param, err
    return err["message"]


@pytest.mark.slow
def test_uploads_over_the_duration_cap_and_garbage_are_400s(server, http) -> None:
    pid = server.engine_pid()
    message = _error(_transcribe(http, _wav(3.0, 192_000)), 400, "file")  # 1.1 MB, 3 s
    assert "from its header" in message and "limit of 2 s" in message
    ok = _transcribe(http, _wav(1.5, 192_000))  # under the cap at any rate: transcribed
    assert ok.status_code == 200, ok.text
    for seed in range(12):
        resp = _transcribe(http, _garbage(seed), name=f"g{seed}.bin")
        assert resp.status_code in (200, 400), resp.text  # noise may decode; never a 5xx
        if resp.status_code == 400:
            assert resp.json()["error"]["param"] == "file"
    big_prompt = _transcribe(http, _wav(0.5, 16_000), prompt="x" * 100_000)
    _error(big_prompt, 400, "prompt")
    many = http.post("/v1/audio/transcriptions", files=[("file", ("a.wav", _wav(0.5, 16_000)))]
                     + [(f"f{i}", (None, "1")) for i in range(300)])
    assert many.status_code == 400 and "too many" in many.json()["error"]["message"]
    assert http.get("/health").status_code == 200 and server.engine_pid() == pid


def _ws_url(server) -> str:
    return server.url.replace("http://", "ws://") + "/v1/realtime"


async def _recv(ws, timeout: float = 30.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


def _b64(samples: np.ndarray) -> str:
    return base64.b64encode((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()).decode()


@pytest.mark.slow
def test_realtime_frame_buffer_and_session_caps(server, http) -> None:
    import websockets

    async def run() -> None:
        connect = dict(proxy=None, max_size=None, open_timeout=30)
        async with websockets.connect(_ws_url(server), **connect) as ws:
            assert (await _recv(ws))["type"] == "session.created"
            await ws.send(json.dumps({"type": "session.update", "model": "whisper-tiny.en"}))
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": "A" * (9 * 1024 * 1024)}))  # over 8 MiB
            got = await _recv(ws)
            assert got["type"] == "error" and got["code"] == "invalid_event", got
            for bad in ("!!!!", "é" * 8, "QUJD"):  # not base64, not ASCII, odd byte count
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": bad}))
                got = await _recv(ws)
                assert got["type"] == "error" and got["code"] == "invalid_audio", got
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": _b64(np.zeros(16_000 * 4, np.float32))}))
            got = await _recv(ws)  # 4 s into a 3 s buffer
            assert got["type"] == "error" and got["code"] == "invalid_audio", got
            # two sessions are open (this one and the next); a third is turned away: the
            # protocol's error event naming the limit (vLLM's or OpenAI's shape), then 1013
            async with websockets.connect(_ws_url(server), **connect) as second:
                assert (await _recv(second))["type"] == "session.created"
                for query, shape in (("", "vllm"), ("?intent=transcription", "openai")):
                    async with websockets.connect(_ws_url(server) + query, **connect) as third:
                        got = await _recv(third)  # the error comes before the close
                        assert got["type"] == "error", got
                        if shape == "vllm":
                            assert got["code"] == "session_limit_reached", got
                            assert "--realtime-max-sessions" in got["error"], got
                        else:
                            assert got["error"]["code"] == "session_limit_reached", got
                            assert got["error"]["type"] == "server_error", got
                            assert "--realtime-max-sessions" in got["error"]["message"]
                        with pytest.raises(websockets.ConnectionClosed) as closed:
                            await _recv(third)
                    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": _b64(np.zeros(1600, np.float32))}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
            while (event := await _recv(ws, 60))["type"] != "transcription.done":
                assert event["type"] == "transcription.delta", event
        # the sessions are closed: a new one is accepted
        async with websockets.connect(_ws_url(server), **connect) as ws:
            assert (await _recv(ws))["type"] == "session.created"

    asyncio.run(run())
    assert http.get("/health").status_code == 200
