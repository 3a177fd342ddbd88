"""WS /v1/realtime against a real `fornax serve whisper-tiny.en`: both protocols event by event,
real-time streaming (deltas before the commit, WER, provisional deltas that the final text
continues or replaces), error codes, API-key forms, limits, 20 concurrent sessions and 20
disconnects (the transcriber's unit tests: tests/unit/test_realtime_transcriber.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time

import httpx
import numpy as np
import pytest

from fornax.audio.decode import decode_audio, resample
from helpers.whisper_fixtures import AUDIO_DIR, manifest, packaged_whisper, word_error_rate

KEY = "rt-key"
SHORT = manifest()["short"]


# ---- the server ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    from helpers.api_server import serving

    packaged_whisper("whisper-tiny.en")  # `make install` installs it: fails when missing
    with serving("whisper-tiny.en", "--api-key", KEY, "--realtime-max-buffer-seconds", "20",
                 "--realtime-idle-timeout", "3", "--max-num-seqs", "64") as server:
        yield server


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    return {name: decode_audio((AUDIO_DIR / name).read_bytes()) for name in SHORT}


def _url(server, query: str = "") -> str:
    return server.url.replace("http://", "ws://") + "/v1/realtime" + query


def _b64(samples: np.ndarray) -> str:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    return base64.b64encode(pcm.tobytes()).decode()


async def _connect(server, query: str = "", key: str | None = KEY, **kwargs):
    import websockets

    headers = {"Authorization": f"Bearer {key}"} if key else None
    return await websockets.connect(_url(server, query), additional_headers=headers, proxy=None,
                                    max_size=None, open_timeout=30, **kwargs)


async def _recv(ws, timeout: float = 30.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def _stream(ws, audio: np.ndarray, realtime: bool, rate: int = 16000) -> None:
    step = rate // 10
    start = time.monotonic()
    for i, pos in enumerate(range(0, len(audio), step)):
        await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                  "audio": _b64(audio[pos:pos + step])}))
        if realtime:
            await asyncio.sleep(max(0.0, start + (i + 1) * 0.1 - time.monotonic()))


async def _vllm_session(server, audio: np.ndarray, realtime: bool = True) -> dict:
    """One vLLM-protocol session: events with arrival times, and when the final commit went."""
    async with await _connect(server) as ws:
        created = await _recv(ws)
        await ws.send(json.dumps({"type": "session.update", "model": "whisper-tiny.en"}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        events: list[tuple[float, dict]] = []

        async def reader():
            while True:
                event = await _recv(ws, 60)
                events.append((time.monotonic(), event))
                if event["type"] in ("transcription.done", "error"):
                    return

        task = asyncio.create_task(reader())
        await _stream(ws, audio, realtime)
        committed_at = time.monotonic()
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
        await asyncio.wait_for(task, 60)
    return {"created": created, "events": events, "committed_at": committed_at}


def _provisional(deltas: str, final: str) -> None:
    """An utterance's deltas are provisional: the final text either continues them (the last
    delta carries the rest, so they add up to it) or replaces them (no delta after the point
    where they differ)."""
    assert deltas, "no delta before the final text"
    assert deltas == final or not final.startswith(deltas), (deltas, final)


def _with_silence(audio: np.ndarray, before: float = 0.3, after: float = 0.3) -> np.ndarray:
    return np.concatenate([np.zeros(int(before * 16000), np.float32), audio,
                           np.zeros(int(after * 16000), np.float32)])


@pytest.mark.slow
def test_vllm_protocol_streams_deltas_before_the_commit_in_real_time(server, clips):
    out = asyncio.run(_vllm_session(server, _with_silence(clips["en_04.flac"])))
    created = out["created"]
    assert created["type"] == "session.created" and created["id"].startswith("sess-")
    assert abs(created["created"] - time.time()) < 120
    events = [e for _, e in out["events"]]
    assert [e["type"] for e in events[:-1]] == ["transcription.delta"] * (len(events) - 1)
    done = events[-1]
    assert done["type"] == "transcription.done", done
    deltas = [e["delta"] for e in events[:-1]]
    _provisional("".join(deltas), done["text"])
    early = [e for t, e in out["events"] if t < out["committed_at"]]
    assert len(early) >= 3, "deltas must arrive while the audio streams, before the commit"
    assert word_error_rate([SHORT["en_04.flac"]], [done["text"]]) <= 0.15
    usage = done["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def _openai_session(server, audio16k: np.ndarray) -> list[dict]:
    audio = resample(audio16k, 16000, 24000)  # the protocol's 24 kHz
    async with await _connect(server, "?intent=transcription", key=None,
                              subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as ws:
        assert ws.subprotocol == "realtime"
        events = [await _recv(ws)]
        await ws.send(json.dumps({"type": "transcription_session.update", "event_id": "c1",
                                  "session": {"input_audio_format": "pcm16",
                                              "input_audio_transcription": {
                                                  "model": "whisper-tiny.en", "language": "en"},
                                              "turn_detection": {"type": "server_vad",
                                                                 "silence_duration_ms": 500}}}))
        events.append(await _recv(ws))

        streamed = asyncio.Event()

        def open_items() -> set[str]:
            started = {e["item_id"] for e in events
                       if e["type"] == "input_audio_buffer.speech_started"}
            return started - {e["item_id"] for e in events
                              if e["type"].endswith("transcription.completed")}

        async def reader():
            while not (streamed.is_set() and not open_items()):
                try:
                    events.append(await _recv(ws, 1.0))
                except asyncio.TimeoutError:
                    pass

        task = asyncio.create_task(reader())
        await _stream(ws, np.concatenate([audio, np.zeros(24000, np.float32)]), True, 24000)
        streamed.set()
        await asyncio.wait_for(task, 60)
    return events


@pytest.mark.slow
def test_openai_transcription_session_event_by_event(server, clips):
    events = asyncio.run(_openai_session(server, _with_silence(clips["en_03.flac"])))
    assert events[0]["type"] == "transcription_session.created"
    updated = events[1]
    assert updated["type"] == "transcription_session.updated"
    assert updated["session"]["turn_detection"]["silence_duration_ms"] == 500
    assert updated["session"]["input_audio_transcription"]["model"] == "whisper-tiny.en"
    items: dict[str, list[str]] = {}
    for e in events[2:]:
        assert e["event_id"].startswith("event_")
        items.setdefault(e.get("item_id") or e.get("item", {}).get("id"), []).append(e["type"])
    assert items, events
    transcripts = []
    for item_id, kinds in items.items():
        # speech starts; deltas while speaking (maybe after the stop too); then commit, item, done
        assert kinds[0] == "input_audio_buffer.speech_started", kinds
        assert kinds[-1] == "conversation.item.input_audio_transcription.completed", kinds
        stop = kinds.index("input_audio_buffer.speech_stopped")
        assert kinds[stop + 1:stop + 3] == ["input_audio_buffer.committed",
                                            "conversation.item.created"], kinds
        assert set(kinds[1:stop]) <= {"conversation.item.input_audio_transcription.delta"}
        mine = [e for e in events if e.get("item_id") == item_id]
        deltas = "".join(e["delta"] for e in mine if e["type"].endswith("transcription.delta"))
        completed = mine[-1]
        _provisional(deltas, completed["transcript"])
        assert completed["content_index"] == 0
        assert completed["usage"]["type"] == "duration" and completed["usage"]["seconds"] > 0
        transcripts.append(completed["transcript"])
    first = next(k for k in items.values())
    assert "conversation.item.input_audio_transcription.delta" in first[:first.index(
        "input_audio_buffer.speech_stopped")], "deltas must come while the speaker talks"
    committed = [e for e in events if e["type"] == "input_audio_buffer.committed"]
    assert committed[0]["previous_item_id"] is None
    assert word_error_rate([SHORT["en_03.flac"]], [" ".join(transcripts)]) <= 0.15


@pytest.mark.slow
def test_bad_events_get_error_codes_and_the_vllm_session_goes_on(server, clips):
    async def run():
        async with await _connect(server) as ws:
            await _recv(ws)
            cases = [
                ("{not json", "invalid_json"),
                ("[1, 2]", "invalid_event"),
                (json.dumps({"no": "type"}), "invalid_event"),
                (json.dumps({"type": "response.create"}), "unknown_event"),
                (json.dumps({"type": "input_audio_buffer.commit"}), "model_not_validated"),
                (json.dumps({"type": "session.update", "model": "gpt-4o"}), "model_not_found"),
                (json.dumps({"type": "input_audio_buffer.append", "audio": "###"}),
                 "invalid_audio"),
                (json.dumps({"type": "input_audio_buffer.append", "audio": "AA=="}),
                 "invalid_audio"),  # 1 byte: not 16-bit PCM
                (json.dumps({"type": "input_audio_buffer.append", "audio": ""}), "invalid_audio"),
                (json.dumps({"type": "input_audio_buffer.append"}), "invalid_event"),
                (json.dumps({"type": "session.update", "model": 7}), "invalid_event"),
                (b"\x00\x01binary", "invalid_event"),
            ]
            for frame, code in cases:
                await ws.send(frame)
                event = await _recv(ws)
                assert event["type"] == "error" and event["code"] == code, (frame, event)
                assert isinstance(event["error"], str) and event["error"]
            await ws.send(json.dumps({"type": "session.update", "model": "whisper-tiny.en"}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": "yes"}))
            assert (await _recv(ws))["code"] == "invalid_event"
            await _stream(ws, _with_silence(clips["en_00.flac"]), realtime=False)
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
            while (event := await _recv(ws, 60))["type"] != "transcription.done":
                assert event["type"] == "transcription.delta", event
            assert word_error_rate([SHORT["en_00.flac"]], [event["text"]]) <= 0.25
            # the next task on the same connection
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
            assert await _recv(ws) == {"type": "transcription.done", "text": "",
                                       "usage": {"prompt_tokens": 0, "total_tokens": 0,
                                                 "completion_tokens": 0}}

    asyncio.run(run())


@pytest.mark.slow
def test_openai_errors_echo_the_event_and_the_session_goes_on(server, clips):
    async def run():
        async with await _connect(server) as ws:
            assert (await _recv(ws))["type"] == "session.created"
            await ws.send(json.dumps({"type": "transcription_session.update",
                                      "session": {"turn_detection": None}}))
            updated = await _recv(ws)
            assert updated["type"] == "transcription_session.updated"
            assert updated["session"]["turn_detection"] is None
            cases = [
                ({"type": "conversation.item.create", "event_id": "e1"}, "unknown_event"),
                ({"type": "transcription_session.update", "event_id": "e2", "session": {
                    "input_audio_transcription": {"model": "whisper-1"}}}, "model_not_found"),
                ({"type": "transcription_session.update", "event_id": "e3", "session": {
                    "turn_detection": {"type": "fancy_vad"}}}, "invalid_event"),
                ({"type": "transcription_session.update", "event_id": "e4", "session": {
                    "input_audio_format": "g711_ulaw"}}, "invalid_event"),
                ({"type": "transcription_session.update", "event_id": "e5", "session": {
                    "input_audio_transcription": {"language": "de"}}}, "invalid_event"),
                ({"type": "input_audio_buffer.commit", "event_id": "e6"},
                 "input_audio_buffer_commit_empty"),
                ({"type": "input_audio_buffer.append", "event_id": "e7", "audio": "%%"},
                 "invalid_audio"),
            ]
            for event, code in cases:
                await ws.send(json.dumps(event))
                got = await _recv(ws)
                assert got["type"] == "error", (event, got)
                err = got["error"]
                assert err["code"] == code and err["event_id"] == event["event_id"], got
                assert err["type"] == "invalid_request_error" and err["message"]
            # manual commits: deltas for the buffer, then committed and completed
            audio = resample(_with_silence(clips["en_07.flac"]), 16000, 24000)
            await _stream(ws, audio, realtime=False, rate=24000)
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            kinds, deltas = [], ""
            while True:
                event = await _recv(ws, 60)
                kinds.append(event["type"])
                if event["type"].endswith("transcription.delta"):
                    deltas += event["delta"]
                if event["type"].endswith("transcription.completed"):
                    break
            assert "input_audio_buffer.committed" in kinds and event["transcript"] == deltas
            assert word_error_rate([SHORT["en_07.flac"]], [deltas]) <= 0.25
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": _b64(np.zeros(2400, np.float32))}))
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            assert (await _recv(ws))["type"] == "input_audio_buffer.cleared"

    asyncio.run(run())


@pytest.mark.slow
def test_api_key_forms(server):
    import websockets

    async def run():
        for query, key, protocols in [("", None, None), ("", "wrong", None),
                                      ("?api_key=wrong", None, None),
                                      ("", None, ["openai-insecure-api-key.wrong"])]:
            with pytest.raises(websockets.InvalidStatus) as info:
                await _connect(server, query, key=key, subprotocols=protocols)
            assert info.value.response.status_code == 403
        for query, key, protocols in [(f"?api_key={KEY}", None, None), ("", KEY, None),
                                      ("", None, [f"openai-insecure-api-key.{KEY}"])]:
            async with await _connect(server, query, key=key, subprotocols=protocols) as ws:
                assert (await _recv(ws))["type"] == "session.created"
                assert ws.subprotocol is None  # the key is never echoed
        async with websockets.connect(_url(server), additional_headers={"x-api-key": KEY},
                                      proxy=None) as ws:
            assert (await _recv(ws))["type"] == "session.created"
        # a web page of another origin (no --allowed-origins) is refused even with the key
        with pytest.raises(websockets.InvalidStatus):
            await _connect(server, origin="http://evil.example")

    asyncio.run(run())


@pytest.mark.slow
def test_buffer_limit_and_idle_timeout(server, clips):
    import websockets

    async def run():
        speech = np.concatenate([_with_silence(c, 0, 0) for c in clips.values()])  # ~40 s
        async with await _connect(server) as ws:
            await _recv(ws)
            await ws.send(json.dumps({"type": "session.update", "model": None}))
            errors = 0
            for pos in range(0, len(speech), 16000):  # 1 s chunks, far faster than real time
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": _b64(speech[pos:pos + 16000])}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
            while (event := await _recv(ws, 120))["type"] != "transcription.done":
                if event["type"] == "error":
                    assert event["code"] == "invalid_audio" and "buffer is full" in \
                        event["error"] and "--realtime-max-buffer-seconds" in event["error"]
                    errors += 1
            assert errors > 0 and len(event["text"].split()) > 20
        async with await _connect(server) as ws:
            await _recv(ws)
            start = time.monotonic()
            event = await _recv(ws, 10)
            assert event["code"] == "idle_timeout" and 2.5 < time.monotonic() - start < 6
            with pytest.raises(websockets.ConnectionClosedOK):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1000

    asyncio.run(run())


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert m, name
    return float(m.group(1))


@pytest.mark.slow
def test_twenty_concurrent_sessions_then_twenty_disconnects(server, clips):
    names = list(SHORT)
    outs = asyncio.run(_many(server, [clips[names[i % len(names)]] for i in range(20)]))
    texts = []
    for out in outs:
        events = [e for _, e in out["events"]]
        done = events[-1]
        assert done["type"] == "transcription.done", events
        _provisional("".join(e["delta"] for e in events[:-1]), done["text"])
        texts.append(done["text"])
    refs = [SHORT[names[i % len(names)]] for i in range(20)]
    assert word_error_rate(refs, texts) <= 0.15
    assert all(word_error_rate([r], [t]) <= 0.4 for r, t in zip(refs, texts))

    # 20 sessions stop mid-utterance without a word: everything they had in the engine ends
    log_before = len(server.log())
    asyncio.run(_disconnect_many(server, [clips[n] for n in names] * 3))
    headers = {"Authorization": f"Bearer {KEY}"}
    deadline = time.monotonic() + 10
    while True:
        metrics = httpx.get(server.url + "/metrics", headers=headers, timeout=10).text
        busy = _metric(metrics, "vllm:num_requests_running") + \
            _metric(metrics, "vllm:num_requests_waiting")
        if (busy == 0 and _metric(metrics, "vllm:websocket_connections_active") == 0) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert busy == 0 and _metric(metrics, "vllm:websocket_connections_active") == 0
    assert _metric(metrics, "vllm:websocket_connections_total") >= 40
    aborted = len(re.findall(r"ended with a decode in flight: aborted it",
                             server.log()[log_before:]))
    assert aborted >= 1, "the disconnected sessions had decodes in flight: they must be aborted"


async def _many(server, audios: list[np.ndarray]) -> list[dict]:
    return await asyncio.gather(*(_vllm_session(server, _with_silence(a)) for a in audios))


async def _disconnect_many(server, audios: list[np.ndarray]) -> None:
    async def one(audio):
        ws = await _connect(server)
        await _recv(ws)
        await ws.send(json.dumps({"type": "session.update", "model": "whisper-tiny.en"}))
        await _stream(ws, audio[: 16000 * 2], realtime=True)
        ws.transport.abort()  # gone mid-utterance, no close handshake

    await asyncio.gather(*(one(a) for a in audios[:20]))


@pytest.mark.slow
def test_bench_realtime_writes_a_valid_record(server, tmp_path):
    from fornax.perf.cli import main as bench
    from fornax.perf.schema import validate_record

    out = tmp_path / "rt.json"
    assert bench(["realtime", "--base-url", server.url, "--api-key", KEY, "--concurrency", "1",
                  "--utterances", "1", "--warmup", "0", "--modes", "simultaneous,staggered",
                  "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert validate_record(record) == []
    metrics = record["metrics"]
    assert 0 < metrics["final_latency_p50_ms"] < 5000 and metrics["num_utterances"] == 2
    level = record["details"]["levels"][0]
    assert level["deltas_replaced"] in (0, 1) and 0 <= level["wer_vs_file"] <= 0.2
    # each mode is its own labelled level; CPU use is only known for a server it started
    assert [lv["mode"] for lv in record["details"]["levels"]] == ["simultaneous", "staggered"]
    assert level["cpu_util"] is None and len(level["loadavg_1_5_15"]) == 3
    (ref, text), = record["details"]["transcripts"].items()
    assert record["details"]["file_transcripts"][ref] and text


@pytest.mark.slow
def test_a_text_model_answers_with_an_error_event_and_closes(main_server):
    import websockets

    from helpers.api_server import API_KEYS

    server = main_server  # tiny llama, --allowed-origins http://good.example

    async def run():
        async with await _connect(server, key=API_KEYS[0], origin="http://good.example") as ws:
            event = await _recv(ws)
            assert event["type"] == "error" and event["code"] == "model_not_found"
            assert "not a speech-to-text model" in event["error"]
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1008

    asyncio.run(run())
