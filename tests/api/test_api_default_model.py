"""`fornax serve` with no MODEL: the packaged trio from one port. SmolLM2 answers sensibly, and the
same server embeds (all-MiniLM-L6-v2) and transcribes (Whisper tiny.en, also over WS
/v1/realtime), all at once."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from fornax.audio.decode import decode_audio
from helpers.api_server import serving
from helpers.whisper_fixtures import AUDIO_DIR, manifest, word_error_rate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    with serving(None, "--max-model-len", "2048", timeout_s=400) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def test_serves_the_packaged_trio_under_their_names(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct", "all-MiniLM-L6-v2",
                                      "whisper-tiny.en"]
    assert models[0].model_extra["root"].endswith(".gguf")
    assert models[0].model_extra["max_model_len"] == 2048  # the command line's: the chat model's
    assert [m.model_extra["max_model_len"] for m in models[1:]] == [256, 448]


def test_every_surface_answers_at_once(server, client):
    name = "en_00.flac"
    audio = (AUDIO_DIR / name).read_bytes()
    expected = manifest()["short"][name]
    jobs = {
        "chat": lambda: client.chat.completions.create(
            model="SmolLM2-135M-Instruct", max_tokens=20, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}]
        ).choices[0].message.content,
        "embed": lambda: client.embeddings.create(model="all-MiniLM-L6-v2",
                                                  input=["a cat", "a kitten", "taxes"]).data,
        "speech": lambda: client.audio.transcriptions.create(
            model="whisper-tiny.en", file=(name, audio)).text,
        "realtime": lambda: asyncio.run(_realtime(server, audio)),
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {k: pool.submit(job) for k, job in jobs.items()}
        got = {k: f.result() for k, f in futures.items()}
    assert "Paris" in got["chat"]
    vectors = [d.embedding for d in got["embed"]]
    cos = [sum(a * b for a, b in zip(vectors[0], v, strict=True)) for v in vectors[1:]]
    assert len(vectors[0]) == 384 and cos[0] > cos[1]  # normalized: a cat is near a kitten
    assert word_error_rate([expected], [got["speech"]]) <= 0.3, got["speech"]  # tiny.en
    assert word_error_rate([expected], [got["realtime"]]) <= 0.3, got["realtime"]


async def _realtime(server, flac: bytes) -> str:
    """One vLLM-protocol WS /v1/realtime session on the trio (its speech model by default)."""
    import base64

    import numpy as np
    import websockets

    samples = decode_audio(flac)
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    url = server.url.replace("http://", "ws://") + "/v1/realtime"
    async with websockets.connect(url, proxy=None, max_size=None, open_timeout=30) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({"type": "session.update", "model": "whisper-tiny.en"}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        for pos in range(0, len(pcm), 32000):
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(pcm[pos:pos + 32000]).decode()}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), 120))
            assert event["type"] != "error", event
            if event["type"] == "transcription.done":
                return event["text"]


def test_chat_answers_a_simple_question(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages,
                                         max_tokens=30, temperature=0)
    text = out.choices[0].message.content
    assert "Paris" in text, text
    assert out.choices[0].finish_reason == "stop"  # ends with its end-of-turn token
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, max_tokens=30, temperature=0,
        stream=True) if c.choices)
    assert streamed == text


def test_completion_continues_text(client):
    out = client.completions.create(model="SmolLM2-135M-Instruct",
                                    prompt="The capital of Italy is Rome. The capital of France is",
                                    max_tokens=5, temperature=0)
    assert "Paris" in out.choices[0].text, out.choices[0].text


def test_audio_form_keep_alive_is_read_and_bounded(server, client):
    """keep_alive rides on the audio form too (a form part, as on JSON bodies): a bad one is a
    400 naming it, a good one is honoured (the model stays loaded after the request)."""
    import httpx

    audio = (AUDIO_DIR / "en_00.flac").read_bytes()
    form = {"model": "whisper-tiny.en"}
    for bad in ("soon", "9999h"):
        r = httpx.post(server.url + "/v1/audio/transcriptions", timeout=120,
                       data={**form, "keep_alive": bad}, files={"file": ("a.flac", audio)})
        assert r.status_code == 400 and r.json()["error"]["param"] == "keep_alive", r.text
    r = httpx.post(server.url + "/v1/audio/transcriptions", timeout=120,
                   data={**form, "keep_alive": "-1"}, files={"file": ("a.flac", audio)})
    assert r.status_code == 200 and r.json()["text"], r.text
    states = {m.id: m.model_extra["status"] for m in client.models.list().data}
    assert states["whisper-tiny.en"] == "loaded"
