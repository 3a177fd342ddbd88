"""Fuzzes WS /v1/realtime: random event sequences, malformed JSON, huge frames, bad base64, wrong
types; checks that no event fails inside the server and no session ends with 1011 (fuzzer
process)."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from helpers.fuzzing.cases import API_KEY
from helpers.fuzzing.routes import ASR, MODEL_NAMES
from helpers.fuzzing.values import any_json, edge_text

QUIET_S = 0.4  # a session's answers are read until the server is quiet this long


def _pcm(seconds: float, tone: bool, rate: int = 16000) -> str:
    t = np.arange(int(seconds * rate)) / rate
    samples = 0.3 * np.sin(2 * np.pi * 330 * t) if tone else np.zeros_like(t)
    return base64.b64encode((samples * 32767).astype("<i2").tobytes()).decode()


_AUDIO = {"tone": _pcm(0.4, True), "silence": _pcm(0.2, False), "odd": "AAA=",
          "one": "AA==", "bad": "###", "empty": "", "padless": "AAAA" * 3 + "A",
          "unicode": "ÄÖÜ=", "rate24k": _pcm(0.3, True, 24000)}
_HUGE = "A" * (9 * 1024 * 1024)  # past the 8 MiB event cap


def _events() -> st.SearchStrategy[Any]:
    model = st.one_of(st.just(MODEL_NAMES[ASR]), edge_text(), any_json())
    audio = st.one_of(st.sampled_from(sorted(_AUDIO)).map(_AUDIO.__getitem__), any_json())
    session = st.one_of(
        st.just({"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 200}}}}),
        st.fixed_dictionaries({"input_audio_format": st.sampled_from(("pcm16", "g711", "x")),
                               "turn_detection": st.one_of(st.none(), any_json())}),
        st.dictionaries(edge_text(), any_json(), max_size=3), any_json())
    kinds = st.sampled_from(("session.update", "transcription_session.update",
                             "input_audio_buffer.append", "input_audio_buffer.commit",
                             "input_audio_buffer.clear", "response.create", "x"))
    return st.one_of(
        st.fixed_dictionaries({"type": st.just("session.update"), "model": model}),
        st.fixed_dictionaries({"type": st.sampled_from(("session.update",
                                                        "transcription_session.update")),
                               "session": session}),
        st.fixed_dictionaries({"type": st.just("input_audio_buffer.append"), "audio": audio}),
        st.fixed_dictionaries({"type": st.just("input_audio_buffer.commit"),
                               "final": st.one_of(st.booleans(), any_json())}),
        st.fixed_dictionaries({"type": kinds, "event_id": st.one_of(edge_text(), any_json())}),
        st.dictionaries(st.sampled_from(("type", "audio", "model", "session", "final")),
                        any_json(), max_size=3),
        st.builds(lambda kind, extra: {"type": kind, **extra}, kinds,
                  st.dictionaries(edge_text(), any_json(), max_size=2)))


FRAMES = st.one_of(
    _events().map(lambda e: ("json", e)),
    _events().map(lambda e: ("json", e)),
    st.sampled_from(("{not json", "[1, 2]", "", "null", "\"x\"", "{\"type\": 1}",
                     "{\"type\": \"input_audio_buffer.append\", \"audio\": \"\\ud800\"}")
                    ).map(lambda t: ("text", t)),
    st.binary(max_size=64).map(lambda b: ("bytes", b)),
    st.just(("huge", None)))


@dataclass
class Session:
    query: str
    key: str | None
    frames: list[tuple[str, Any]]
    abrupt: bool = False  # drop the TCP connection right after the frames (no close handshake)


def _rare(options: tuple[Any, ...], common: Any) -> st.SearchStrategy[Any]:
    """`common` nine times in ten (hypothesis favours small integers: 0 maps to common)."""
    return st.integers(0, 2**32 - 1).map(
        lambda n: options[(n // 10) % len(options)] if n % 10 == 9 else common)


SESSIONS = st.builds(
    Session, _rare(("?intent=transcription", "?model=asr", "?x=%00", "?intent=transcription"),
                   ""),
    _rare((None, "wrong"), API_KEY), st.lists(FRAMES, min_size=1, max_size=10),
    _rare((True,), False))


@dataclass
class RealtimeStats:
    sessions: int = 0
    frames: int = 0
    events: dict[str, int] = field(default_factory=dict)
    closes: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _encode(kind: str, value: Any) -> str | bytes:
    if kind == "json":
        try:
            return json.dumps(value)
        except (ValueError, RecursionError):
            return "{\"type\": \"deep\"}"
    if kind == "huge":
        return json.dumps({"type": "input_audio_buffer.append", "audio": _HUGE})
    return value


async def run_session(url: str, session: Session, stats: RealtimeStats) -> None:
    import websockets

    headers = {"Authorization": f"Bearer {session.key}"} if session.key else None
    stats.sessions += 1
    try:
        ws = await websockets.connect(url.replace("http://", "ws://") + "/v1/realtime"
                                      + session.query, additional_headers=headers, proxy=None,
                                      max_size=None, open_timeout=30)
    except websockets.InvalidStatus as exc:
        code = exc.response.status_code
        stats.closes[f"http_{code}"] = stats.closes.get(f"http_{code}", 0) + 1
        if code >= 500:
            stats.problems.append(f"the WebSocket handshake got HTTP {code}")
        return
    trail: list[str] = []
    try:
        async def reader() -> None:
            while True:
                try:
                    text = await asyncio.wait_for(ws.recv(), QUIET_S)
                except asyncio.TimeoutError:
                    return
                try:
                    event = json.loads(text)
                except ValueError:
                    stats.problems.append(f"a non-JSON event {text[:200]!r}")
                    continue
                kind = str(event.get("type"))
                stats.events[kind] = stats.events.get(kind, 0) + 1
                code = event.get("code") or (event.get("error") or {}).get("code") \
                    if isinstance(event.get("error"), dict) else event.get("code")
                if code == "processing_error":
                    stats.problems.append(f"processing_error after {trail}: {text[:400]}")

        for kind, value in session.frames:
            frame = _encode(kind, value)
            trail.append(frame[:120] if isinstance(frame, str) else repr(frame[:40]))
            stats.frames += 1
            await ws.send(frame)
        if session.abrupt:
            ws.transport.abort()
            stats.closes["abrupt"] = stats.closes.get("abrupt", 0) + 1
            return
        await reader()
        await ws.close()
    except websockets.ConnectionClosed:
        pass
    code = ws.close_code
    stats.closes[str(code)] = stats.closes.get(str(code), 0) + 1
    if code == 1011:
        stats.problems.append(f"the session closed with 1011 ({ws.close_reason}) after {trail}")


def run_realtime(url: str, sessions: int, seed_value: int) -> RealtimeStats:
    stats = RealtimeStats()

    @seed(seed_value)
    @settings(max_examples=sessions, database=None, deadline=None, phases=(Phase.generate,),
              suppress_health_check=list(HealthCheck))
    @given(SESSIONS)
    def one(session: Session) -> None:
        asyncio.run(run_session(url, session, stats))

    one()
    return stats
